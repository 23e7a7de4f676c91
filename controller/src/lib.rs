//! supermesh-controller: reconciles Mesh, EdgeNode and Microservice, places
//! microservices on edge nodes and serves metrics and health.

pub mod aggregator;
pub mod cloudhub;
pub mod coalesce;
pub mod conditions;
pub mod context;
pub mod crds;
pub mod discovery;
pub mod edgenode;
pub mod error;
#[cfg(test)]
pub mod fixtures;
pub mod http;
pub mod index;
pub mod membership;
pub mod mesh;
pub mod metrics;
pub mod microservice;
pub mod placement;
pub mod run;
pub mod wire;

pub use error::{Error, Result};
