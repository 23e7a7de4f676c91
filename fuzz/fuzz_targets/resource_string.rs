//! Resource strings (`namespace/type[/name]`), as every message and store key carries
//! them: `ResourceRef::parse` accepts only what it can split back into the same string.
#![no_main]

use libfuzzer_sys::fuzz_target;
use supermesh_protocol::ResourceRef;

fuzz_target!(|text: &str| {
    let Ok(r) = ResourceRef::parse(text) else { return };
    let rebuilt = match r.id {
        Some(id) => ResourceRef::string(r.namespace, r.res_type, id),
        None => format!("{}/{}", r.namespace, r.res_type),
    };
    assert_eq!(rebuilt, text, "a parsed resource string rebuilds as itself");
    assert_eq!(r.key, text);
    for segment in [Some(r.namespace), Some(r.res_type), r.id].into_iter().flatten() {
        assert!(!segment.is_empty() && segment != "." && segment != "..", "{text:?}: segment {segment:?}");
        assert!(!segment.contains('/'), "{text:?}");
    }
    if let Some((namespace, name)) = ResourceRef::microservice(text) {
        assert_eq!(ResourceRef::string(namespace, supermesh_protocol::MICROSERVICE, name), text);
    }
});
