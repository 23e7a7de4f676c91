//! supermesh API: the custom resources of group `supermesh.io`, shared names
//! and the generated CustomResourceDefinitions. No I/O lives here.

pub mod crd;
pub mod edgenode;
pub mod location;
pub mod mesh;
pub mod microservice;
pub mod names;
pub mod peer;
pub mod protocol;

pub use edgenode::{EdgeNode, EdgeNodeSpec, EdgeNodeStatus};
pub use location::Location;
pub use mesh::{Mesh, MeshSpec, MeshStatus, MeshType};
pub use microservice::{Microservice, MicroserviceSpec, MicroserviceStatus};
