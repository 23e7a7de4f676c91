//! supermesh API: the custom resources of group `supermesh.io`, shared names
//! and the generated CustomResourceDefinitions. No I/O lives here. What crosses
//! the wire to agents is in `supermesh-protocol`; the CRDs reuse its `Location`
//! and `NodeRole` only.

pub mod crd;
pub mod edgenode;
pub mod mesh;
pub mod microservice;
pub mod names;

pub use edgenode::{EdgeNode, EdgeNodeSpec, EdgeNodeStatus};
pub use mesh::{Mesh, MeshSpec, MeshStatus, MeshType};
pub use microservice::{Microservice, MicroserviceSpec, MicroserviceStatus};
pub use supermesh_protocol::Location;
