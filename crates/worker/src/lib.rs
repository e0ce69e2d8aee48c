//! `ferry worker`: scheduled cross-site replication. Selections of RBD images (names, globs,
//! cinder volumes, nova instances' disks) are backed up on cron schedules with the engine's
//! RBD backup, pruned by their retention policy, restored in drills; garbage collection runs
//! on its own schedule; uploads follow bandwidth windows; `/metrics` and `/healthz` tell how
//! it goes and `status.json` feeds `ferry status`. No argument parsing or signal handling:
//! the binary wires those to a [`Control`].

#![deny(missing_docs)]

pub mod config;
pub mod cron;
pub mod hooks;
pub mod http;
pub mod select;
pub mod state;
pub mod units;
mod worker;

pub use config::{ConfigError, WorkerConfig};
pub use worker::{last_tick, next_tick, plan, Control, OnceReport, Plan, PlannedVolume, Worker};
