//! supermesh-agent: edgehub, metamanager (SQLite), edged and supernode of an edge device.

pub mod config;
pub mod edged;
pub mod edgehub;
pub mod identity;
pub mod join;
pub mod localapi;
pub mod metamanager;
pub mod metasync;
pub mod run;
pub mod supernode;
