//! End-to-end tests: the `ferry` binary against real stores (local directory, and with the
//! project's dev cluster, Ceph RBD and RGW S3).

mod util;

mod audit;
mod ceph;
mod cli;
mod core;
mod crash;
mod delta;
mod engine;
mod faults;
mod gc;
mod golden;
mod hostile;
mod lifecycle;
mod serve;
mod sync;
mod worker;
