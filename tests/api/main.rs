//! The one integration test binary: real Postgres (a fresh database per test), the fake
//! FusionAuth, fusionsync in-process or as the real binary.

mod admin;
mod chaos;
mod deployment;
mod fake_fusionauth;
mod helpers;
mod inbound;
mod organizations;
mod reliability;
mod users;
