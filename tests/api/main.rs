//! Black-box tests of the API: each starts the real `conductor` binary on port 0 with a
//! temporary data directory and speaks HTTP to it.

mod builds;
mod cli;
mod client;
mod conductor_quirks;
mod disks;
mod ec2;
mod errors;
mod exhaustion;
mod harness;
mod hostile_input;
mod hostile_tenants;
mod jobs;
mod openstack;
mod os_builds;
mod os_checks;
mod providers;
mod pushes;
mod replay;
mod restart;
mod routes;
mod sandbox;
mod serving;
mod template;
mod tenants;
mod upgrade;
