//! The `wsgate` binary: command line, config loading, runtime, signals, exit codes.

use std::path::PathBuf;
use std::process::ExitCode;

use wsgate::config::Config;
use wsgate::observe::{
    self,
    access_log::{AccessLog, Sink},
};

/// `EX_USAGE`: the configuration could not be used.
const EXIT_CONFIG: u8 = 64;
const DEFAULT_CONFIG: &str = "conf/wsgate.yaml";

const USAGE: &str = "usage: wsgate [--config FILE] [--check] [--version]
  --config FILE   configuration file (default conf/wsgate.yaml)
  --check         validate the configuration and exit 0 (valid) or 1 (invalid)
  --version       print the version and exit";

struct Args {
    config: PathBuf,
    check: bool,
}

fn parse_args() -> Result<Option<Args>, String> {
    let mut args = Args {
        config: PathBuf::from(DEFAULT_CONFIG),
        check: false,
    };
    let mut it = std::env::args_os().skip(1);
    while let Some(arg) = it.next() {
        match arg.to_str() {
            Some("--config" | "-c") => {
                args.config = it.next().ok_or("--config needs a file")?.into()
            }
            Some("--check" | "-t") => args.check = true,
            Some("--version" | "-V") => {
                println!("wsgate {}", env!("CARGO_PKG_VERSION"));
                return Ok(None);
            }
            Some("--help" | "-h") => {
                println!("{USAGE}");
                return Ok(None);
            }
            _ => return Err(format!("unknown argument {}", arg.to_string_lossy())),
        }
    }
    Ok(Some(args))
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(Some(args)) => args,
        Ok(None) => return ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wsgate: {e}\n{USAGE}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let config = match Config::load(&args.config) {
        Ok(config) => config,
        Err(errors) => {
            eprintln!("{errors}");
            eprintln!("wsgate: configuration {} is invalid", args.config.display());
            return ExitCode::from(if args.check { 1 } else { EXIT_CONFIG });
        }
    };
    if args.check {
        for warning in &config.warnings {
            eprintln!("warning: {warning}");
        }
        println!("wsgate: configuration {} is valid", args.config.display());
        return ExitCode::SUCCESS;
    }
    observe::init_tracing(&config.log.format);
    let runtime = match build_runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("wsgate: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (code, access) = runtime.block_on(serve(config, args.config));
    // Connections still open at `drain.timeout` are cut here (each logs its line), then
    // the access log is written out before the process ends.
    runtime.shutdown_timeout(EXIT_GRACE);
    if let Some(access) = access {
        access.flush(EXIT_GRACE);
    }
    code
}

/// How long exit waits for cut connections and the access log.
const EXIT_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// One worker per CPU this process may run on. Pinned to a single CPU, a current-thread
/// runtime does the same work without the hand-offs between a worker and the I/O driver.
fn build_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cpus == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Runtime::new()
    }
}

async fn serve(config: Config, path: PathBuf) -> (ExitCode, Option<AccessLog>) {
    // Installed before start-up, which can wait seconds on DNS: a signal then must not
    // meet its default action (a SIGHUP from a service manager would kill the process).
    let Some(mut signals) = Signals::install() else {
        tracing::error!("cannot install signal handlers");
        return (ExitCode::FAILURE, None);
    };
    let sink = Sink::Target(config.log.access.clone());
    let gateway = tokio::select! {
        started = wsgate::start(config, sink) => match started {
            Ok(g) => g,
            Err(e) => {
                tracing::error!("{e}");
                return (ExitCode::FAILURE, None);
            }
        },
        _ = signals.stop() => {
            tracing::info!("stop signal during start-up: exiting");
            return (ExitCode::SUCCESS, None);
        }
    };
    loop {
        match signals.next().await {
            Signal::Stop => break,
            // A reload waiting on DNS must not hold up a stop.
            Signal::Reload => tokio::select! {
                _ = reload(&gateway, &path) => {}
                _ = signals.stop() => break,
            },
            Signal::Reopen => gateway.shared.access.reopen(),
        }
    }
    // A second SIGTERM/SIGINT during the drain means "now".
    tokio::select! {
        _ = gateway.drain() => {}
        _ = signals.stop() => tracing::warn!("second stop signal: exiting without waiting"),
    }
    tracing::info!("exiting");
    (ExitCode::SUCCESS, Some(gateway.shared.access.clone()))
}

enum Signal {
    Stop,
    Reload,
    Reopen,
}

struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
    usr1: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> Option<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Some(Signals {
            term: signal(SignalKind::terminate()).ok()?,
            int: signal(SignalKind::interrupt()).ok()?,
            hup: signal(SignalKind::hangup()).ok()?,
            usr1: signal(SignalKind::user_defined1()).ok()?,
        })
    }

    async fn next(&mut self) -> Signal {
        tokio::select! {
            _ = self.term.recv() => Signal::Stop,
            _ = self.int.recv() => Signal::Stop,
            _ = self.hup.recv() => Signal::Reload,
            _ = self.usr1.recv() => Signal::Reopen,
        }
    }

    async fn stop(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

/// SIGHUP: re-reads and validates the config, certificates included, then applies it. A
/// config that does not load changes nothing.
async fn reload(gateway: &wsgate::Gateway, path: &std::path::Path) {
    match Config::load(path) {
        Ok(config) => {
            for warning in &config.warnings {
                tracing::warn!("{warning}");
            }
            let done = gateway.reload(config).await;
            tracing::info!(
                bound = ?done.bound,
                closed = ?done.closed,
                certificates = ?done.certificates,
                drained = done.drained,
                "configuration reloaded"
            );
            if !done.need_restart.is_empty() {
                tracing::warn!(keys = ?done.need_restart, "these settings changed but apply only after a restart");
            }
        }
        Err(errors) => {
            gateway.shared.metrics.reload_failed();
            for e in &errors.0 {
                tracing::error!("{e}");
            }
            tracing::error!(
                "reload refused: {} is invalid; the running configuration stays in service",
                path.display()
            );
        }
    }
}
