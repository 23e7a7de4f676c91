//! supermesh-controller: reconciles Mesh, EdgeNode and Microservice, places
//! microservices on edge nodes and serves metrics and health.

pub mod aggregator;
pub mod cloudhub;
pub mod clusters;
pub mod coalesce;
pub mod conditions;
pub mod config;
pub mod context;
pub mod crds;
pub mod discovery;
pub mod edgenode;
pub mod error;
#[cfg(test)]
pub mod fixtures;
pub mod forward;
pub mod http;
pub mod index;
pub mod membership;
pub mod mesh;
pub mod metrics;
pub mod microservice;
pub mod placement;
pub mod replicas;
pub mod rollout;
pub mod run;
pub mod tokens;
pub mod view;
pub mod wire;

pub use error::{Error, Result};

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::path::Path;

    /// The top-level modules each top-level module of this crate names (`crate::x`).
    fn uses() -> BTreeMap<String, BTreeSet<String>> {
        fn walk(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
            for entry in std::fs::read_dir(dir).unwrap().flatten() {
                let path = entry.path();
                if path.is_dir() {
                    walk(&path, out);
                } else if path.extension().is_some_and(|e| e == "rs") {
                    out.push(path);
                }
            }
        }
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = Vec::new();
        walk(&src, &mut files);
        let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for file in files {
            let relative = file.strip_prefix(&src).unwrap();
            let first = relative.components().next().unwrap().as_os_str().to_string_lossy().into_owned();
            let module = first.trim_end_matches(".rs").to_owned();
            if matches!(module.as_str(), "lib" | "main" | "bin" | "fixtures") {
                continue;
            }
            let text = std::fs::read_to_string(&file).unwrap();
            // Only production code counts: tests may reach anywhere.
            let production = text.split("#[cfg(test)]").next().unwrap_or_default();
            let named = production.split("crate::").skip(1).filter_map(|rest| {
                let name: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                (!name.is_empty() && name != module && name.chars().next().is_some_and(|c| c.is_ascii_lowercase()))
                    .then_some(name)
            });
            let named: Vec<String> = named.collect();
            graph.entry(module).or_default().extend(named);
        }
        graph
    }

    #[test]
    fn no_module_imports_one_that_imports_it_back() {
        let graph = uses();
        // Depth-first search for a path back to where it started.
        fn reaches(
            graph: &BTreeMap<String, BTreeSet<String>>,
            from: &str,
            to: &str,
            seen: &mut BTreeSet<String>,
        ) -> bool {
            graph
                .get(from)
                .into_iter()
                .flatten()
                .any(|next| next == to || (seen.insert(next.clone()) && reaches(graph, next, to, seen)))
        }
        let circles: Vec<&String> = graph.keys().filter(|m| reaches(&graph, m, m, &mut BTreeSet::new())).collect();
        assert!(circles.is_empty(), "modules on an import circle: {circles:?}\n{graph:#?}");
        assert!(graph["cloudhub"].contains("index") && graph["index"].contains("placement"), "the walk reads imports");
    }
}
