//! Switchyard's benchmark harness: workloads (synthetic and public traces), a streaming load
//! generator, SLO goodput metrics, side-by-side router comparison on a simulated fleet, and
//! the discrete-event fleet simulation that drives the router's own policies in virtual time.

pub mod client;
pub mod compare;
pub mod des;
pub mod metrics;
pub mod policy_spec;
pub mod report;
pub mod scenario;
pub mod ttfb;
pub mod workload;
