//! `switchyard`: parse the command line, start the router (and the demo fleet), run until
//! SIGINT/SIGTERM.

use std::process::ExitCode;

/// See the `mimalloc` feature: the proxy path allocates per request, and glibc's malloc cost
/// ~12 % of the router's CPU under load.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use switchyard::config::{parse_args, Args, ParseOutcome};
#[cfg(feature = "demo")]
use switchyard::demo;
use switchyard::server;

fn main() -> ExitCode {
    let args = match parse_args(std::env::args_os()) {
        ParseOutcome::Run(a) => a,
        ParseOutcome::Print(text) => {
            print!("{text}");
            return ExitCode::SUCCESS;
        }
        ParseOutcome::Fail(line) => {
            eprintln!("{line}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The trace exporter is a task on the runtime.
    let entered = runtime.enter();
    let (_log_guard, exporter) = match init_logging(&args) {
        Ok(logging) => logging,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    drop(entered);
    let outcome = runtime.block_on(run(*args));
    if let Some(exporter) = exporter {
        let _entered = runtime.enter();
        exporter.shutdown();
    }
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Logging type: the file writer's guard (flushes on drop) and the trace exporter.
type Logging = (Option<tracing_appender::non_blocking::WorkerGuard>, Option<switchyard::telemetry::Exporter>);

/// Text or JSON logs to stderr, optionally to daily-rotated files in `--log-dir`, and
/// OpenTelemetry traces when `--otlp-endpoint` is set.
fn init_logging(args: &Args) -> Result<Logging, switchyard::telemetry::TelemetryError> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;
    let filter = || tracing_subscriber::EnvFilter::try_new(&args.log_level).unwrap_or_else(|_| "info".into());
    let json = args.log_json;
    let stderr = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let stderr = if json { stderr.json().with_filter(filter()).boxed() } else { stderr.with_filter(filter()).boxed() };
    let (file, guard) = match &args.log_dir {
        Some(dir) => {
            let (writer, guard) =
                tracing_appender::non_blocking(tracing_appender::rolling::daily(dir, "switchyard.log"));
            let layer = tracing_subscriber::fmt::layer().with_writer(writer).with_ansi(false);
            let layer =
                if json { layer.json().with_filter(filter()).boxed() } else { layer.with_filter(filter()).boxed() };
            (Some(layer), Some(guard))
        }
        None => (None, None),
    };
    let (traces, exporter) = match &args.otlp_endpoint {
        Some(endpoint) => {
            let (layer, exporter) = switchyard::telemetry::layer(endpoint, &args.otlp_service_name)?;
            (Some(layer), Some(exporter))
        }
        None => (None, None),
    };
    tracing_subscriber::registry().with(stderr).with(file).with(traces).init();
    Ok((guard, exporter))
}

async fn run(args: Args) -> Result<(), String> {
    #[cfg_attr(not(feature = "demo"), allow(unused_mut))]
    let mut config = args.to_config().map_err(|e| e.to_string())?;
    #[cfg(feature = "demo")]
    let fleet = demo::DemoFleet::start(&args, &mut config).await?;
    let router = server::start(config).await.map_err(|e| format!("cannot listen: {e}"))?;
    let url = router.url();
    let policy = router.state().router.policy().name();
    println!("switchyard listening on {url} ({} workers, policy {policy})", router.state().registry.all().len());
    #[cfg(feature = "demo")]
    fleet.print(&url, &args.sim_profile);
    wait_for_signal().await;
    tracing::info!("shutting down");
    router.shutdown().await.map_err(|e| e.to_string())
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
