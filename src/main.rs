//! The `qcowfs` command.

use clap::Parser;

use qcowfs::cli::{key_ring, Cli, Command, EXIT_FAILURE, EXIT_OK};
use qcowfs::mount::daemon::{self, MountRequest};
use qcowfs::mount::umount::umount;

fn level(verbose: u8) -> log::LevelFilter {
    match verbose {
        0 => log::LevelFilter::Warn,
        1 => log::LevelFilter::Info,
        2 => log::LevelFilter::Debug,
        _ => log::LevelFilter::Trace,
    }
}

fn main() {
    let cli = Cli::parse();
    let log_level = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| level(cli.verbose));
    // A daemonized mount logs to syslog; everything else to stderr.
    let daemonizes = matches!(&cli.command, Command::Mount(m) if !m.foreground);
    if !daemonizes {
        env_logger::Builder::new()
            .filter_level(log_level)
            .parse_default_env()
            .init();
    }
    let result = match cli.command {
        Command::Mount(m) => key_ring(&m.keys, &m.image, true).and_then(|keys| {
            daemon::mount(MountRequest {
                image: m.image,
                mountpoint: m.mountpoint,
                keys,
                read_only: m.read_only,
                cache_size: m.cache_size,
                foreground: m.foreground,
                allow_other: m.allow_other,
                force_share: m.force_share,
                force: m.force,
                log_level,
            })
        }),
        Command::Umount { mountpoint } => umount(&mountpoint),
        Command::Info(args) => qcowfs::info::run(&args),
    };
    match result {
        Ok(()) => std::process::exit(EXIT_OK),
        Err(e) => {
            eprintln!("qcowfs: {e}");
            std::process::exit(EXIT_FAILURE);
        }
    }
}
