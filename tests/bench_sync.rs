//! `cargo xtask bench sync`: figures for the agent's side of the sync path. A
//! benchmark reports; it never passes or fails on timings.
//!
//! The agent's metamanager store on a real SQLite file: upserts per second with one
//! transaction per message, then batched as the metamanager batches. The cloud's side
//! of the sync path (change-to-ack latency, controller memory and CPU with thousands of
//! agents) is `cargo xtask bench scale`.

use supermesh_agent::metamanager::store::{Change, Store};
use supermesh_agent::metamanager::MAX_BATCH;
use supermesh_protocol::{Assignment, MICROSERVICE};

/// Upserts written in each of the two store modes.
const UPSERTS: usize = 5000;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // `cargo bench` passes --bench; a bench target run by `cargo test --all-targets` gets no
    // arguments, and a test run must not start a benchmark.
    if !args.iter().any(|a| a == "--bench") {
        eprintln!("bench sync: skipped outside `cargo bench`; run it with `cargo xtask bench sync`");
        return;
    }
    if let Some(other) = args.iter().find(|a| *a != "--bench") {
        eprintln!("error: unknown argument {other:?}; bench sync takes none (agents are measured by bench scale)");
        std::process::exit(2);
    }
    eprintln!(
        "==> metamanager store: {UPSERTS} upserts one transaction each, then {UPSERTS} in batches of {MAX_BATCH}"
    );
    match store_bench() {
        Ok(store) => println!("\n{}", store.report()),
        Err(e) => {
            eprintln!("error: store benchmark: {e}");
            std::process::exit(1);
        }
    }
}

/// Store throughput in both modes.
struct StoreFigures {
    one_per_call: f64,
    batched: f64,
    value_bytes: usize,
}

impl StoreFigures {
    fn report(&self) -> String {
        format!(
            "metamanager upserts/s (real SQLite file, WAL, synchronous=FULL, {UPSERTS} each, {}-byte values): \
             one transaction per message {:.0}, batched ({MAX_BATCH}) {:.0} ({:.0}x)",
            self.value_bytes,
            self.one_per_call,
            self.batched,
            self.batched / self.one_per_call
        )
    }
}

/// Writes [`UPSERTS`] new resources one per `apply`, then as many in batches of [`MAX_BATCH`].
fn store_bench() -> Result<StoreFigures, String> {
    // A temp dir on disk, not tmpfs-backed memory: each commit's fsync is the cost measured.
    let dir = tempfile::tempdir().map_err(|e| format!("cannot create a temp dir: {e}"))?;
    let mut store = Store::open(dir.path().join("agent.db")).map_err(|e| e.to_string())?;
    let changes = (0..2 * UPSERTS).map(upsert).collect::<Result<Vec<_>, _>>()?;
    let value_bytes = match &changes[0] {
        Change::Upsert { value, .. } => value.len(),
        Change::Delete { .. } => 0,
    };
    let (single, batched) = changes.split_at(UPSERTS);

    let start = std::time::Instant::now();
    for change in single {
        store.apply(std::slice::from_ref(change)).map_err(|e| e.to_string())?;
    }
    let single_time = start.elapsed();
    let start = std::time::Instant::now();
    for chunk in batched.chunks(MAX_BATCH) {
        store.apply(chunk).map_err(|e| e.to_string())?;
    }
    let batched_time = start.elapsed();

    // Not a timing check: a rate of writes that never happened would be meaningless.
    let written = store.stats().rows_written;
    if written != 2 * UPSERTS as u64 {
        return Err(format!("expected {} rows written, the store wrote {written}", 2 * UPSERTS));
    }
    Ok(StoreFigures {
        one_per_call: UPSERTS as f64 / single_time.as_secs_f64(),
        batched: UPSERTS as f64 / batched_time.as_secs_f64(),
        value_bytes,
    })
}

/// Upsert of a new resource `i` holding what the cloud sends for a typical microservice.
fn upsert(i: usize) -> Result<Change, String> {
    let name = format!("svc-{i:05}");
    let assignment: Assignment = serde_json::from_value(serde_json::json!({
        "namespace": "bench",
        "name": name,
        "uid": format!("3f9c1d2e-8a47-4b6e-9c0d-{i:012x}"),
        "generation": 1,
        "spec": {
            "mesh": "home",
            "command": ["/usr/bin/python3", "-m", "http.server", "8080"],
            "args": ["--bind", "0.0.0.0"],
            "env": [{"name": "LOG_LEVEL", "value": "info"}, {"name": "REPORT_INTERVAL", "value": "10"}],
            "ports": [{"name": "http", "port": 8080}],
            "healthCheck": {"http": {"path": "/healthz", "port": 8080}, "periodSeconds": 5, "failureThreshold": 3},
            "restartPolicy": "Always"
        }
    }))
    .map_err(|e| format!("the sample assignment does not match the protocol: {e}"))?;
    let value = serde_json::to_string(&assignment).map_err(|e| e.to_string())?;
    Ok(Change::Upsert {
        key: assignment.resource(),
        res_type: MICROSERVICE.into(),
        version: assignment.version(),
        value,
    })
}
