//! The `qcowfs` command; started as `mount.fuse.qcowfs`, the mount(8) helper.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::Parser;

use qcowfs::cli::domain_args;
use qcowfs::cli::mount_helper::{self, Invocation};
use qcowfs::cli::{
    exit_status, generate, Cli, Command, EXIT_OK, EXIT_UNVERIFIED_KEY, EXIT_USAGE, EXIT_WRONG_KEY,
};
use qcowfs::error::{Error, Result};
use qcowfs::mount::daemon::{self, MountRequest};
use qcowfs::mount::filelog;
use qcowfs::mount::umount::umount;

fn level(verbose: u8) -> log::LevelFilter {
    match verbose {
        0 => log::LevelFilter::Warn,
        1 => log::LevelFilter::Info,
        2 => log::LevelFilter::Debug,
        _ => log::LevelFilter::Trace,
    }
}

/// Keys and what they are derived from come from a locked arena that core dumps leave out.
#[global_allocator]
static ALLOC: qcowfs::crypto::secret::SecretAwareAlloc = qcowfs::crypto::secret::SecretAwareAlloc;

fn main() {
    // Before any passphrase is read: no core dump and no /proc/PID/mem of this process.
    qcowfs::crypto::secret::protect_process();
    let argv: Vec<OsString> = std::env::args_os().collect();
    let cli = match argv.first() {
        Some(argv0) if mount_helper::is_helper(argv0) => parse_helper(&argv[1..]),
        _ => match domain_args::rewrite(argv) {
            Ok(argv) => Cli::parse_from(argv),
            Err(e) => fail(&e),
        },
    };
    let log_level = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| level(cli.verbose));
    // A daemonized mount logs to syslog or its --log-file; a foreground mount with --log-file to
    // that file; everything else to stderr.
    let log_file = match &cli.command {
        Command::Mount(m) => m.log_file.as_deref().map(absolute_log_file),
        _ => None,
    };
    let log_file = match log_file.transpose() {
        Ok(f) => f,
        Err(e) => fail(&e),
    };
    match &cli.command {
        Command::Mount(m) if !m.foreground => {}
        Command::TransportFloor(f) if !f.foreground => {}
        Command::Mount(_) if log_file.is_some() => {
            let path = log_file.as_deref().unwrap_or(Path::new(""));
            if let Err(e) = filelog::init(path, log_level) {
                fail(&Error::new(path, e));
            }
        }
        _ => env_logger::Builder::new()
            .filter_level(log_level)
            .parse_default_env()
            .init(),
    }
    let result = match cli.command {
        Command::Mount(m) => m.confine.folders().and_then(|within| {
            let keys = m.keys.sources().key_ring(&m.image, true, &within)?;
            daemon::mount(MountRequest {
                image: m.image,
                mountpoint: m.mountpoint,
                keys,
                backing_within: within,
                read_only: m.read_only,
                cache_size: m.cache_size,
                metadata_cache: m.metadata_cache,
                foreground: m.foreground,
                allow_other: m.allow_other,
                force_share: m.force_share,
                key_policy: qcowfs::keys::KeyPolicy {
                    force: m.force,
                    unverified_key: m.unverified_key,
                },
                log_level,
                log_file,
                io_uring: m.transport.io_uring,
                nonempty: m.nonempty,
                null_disk: None,
            })
        }),
        Command::TransportFloor(f) => daemon::mount(MountRequest {
            image: PathBuf::from("transport-floor"),
            mountpoint: f.mountpoint,
            keys: Default::default(),
            backing_within: Vec::new(),
            read_only: false,
            cache_size: 0,
            metadata_cache: 0,
            foreground: f.foreground,
            allow_other: false,
            force_share: false,
            key_policy: Default::default(),
            log_level,
            log_file: None,
            io_uring: f.transport.io_uring,
            nonempty: false,
            null_disk: Some(f.size),
        }),
        Command::Umount { mountpoint } => umount(&mountpoint),
        Command::List(a) => qcowfs::mount::list::run(
            &qcowfs::mount::list::ListOptions { json: a.json },
            &mut std::io::stdout().lock(),
        ),
        Command::Info(args) => info(args),
        Command::Audit(args) => args.confine.folders().and_then(|backing_within| {
            qcowfs::cmd::audit::run(&qcowfs::cmd::audit::AuditOptions {
                json: args.json,
                force_share: args.force_share,
                backing_within,
                paths: args.paths,
            })
        }),
        Command::CheckKey(args) => check_key(&args),
        Command::Check(args) => check(&args),
        Command::Generate(target) => generate::run(&target),
        Command::Ls(args) => guest_command(&args.guest, |g| {
            let opts = qcowfs::cmd::guestfs::LsOptions {
                json: args.json,
                recursive: args.recursive,
            };
            qcowfs::cmd::guestfs::ls(
                g,
                &args.guest.guest_path,
                opts,
                &mut std::io::stdout().lock(),
            )
        }),
        Command::Cat(args) => guest_command(&args, |g| {
            qcowfs::cmd::guestfs::cat(g, &args.guest_path, &mut std::io::stdout().lock())
        }),
        Command::CopyOut(args) => guest_command(&args.guest, |g| {
            let guest = &args.guest.guest_path;
            match args.dest.as_os_str() == "-" {
                true => qcowfs::cmd::guestfs::copy_out_tar(
                    g,
                    guest,
                    &mut std::io::stdout().lock(),
                    true,
                ),
                false => qcowfs::cmd::guestfs::copy_out(g, guest, &args.dest, true),
            }
            .map(|_| ())
        }),
        Command::Edit(args) => edit_command(&args.target, |ed| {
            let editor = args
                .editor
                .clone()
                .or_else(|| std::env::var("VISUAL").ok().filter(|v| !v.is_empty()))
                .or_else(|| std::env::var("EDITOR").ok().filter(|v| !v.is_empty()))
                .unwrap_or_else(|| "vi".to_string());
            if !qcowfs::cmd::guestfs::edit::edit(ed, &args.guest_path, &editor)? {
                eprintln!("qcowfs: unchanged; nothing written");
            }
            Ok(())
        }),
        Command::Write(args) => edit_command(&args.target, |ed| {
            qcowfs::cmd::guestfs::edit::write(ed, &args.guest_path, &mut std::io::stdin().lock())
                .map(|_| ())
        }),
        Command::Rm(args) => edit_command(&args.target, |ed| {
            qcowfs::cmd::guestfs::edit::remove(ed, &args.guest_path)
        }),
        Command::Mkdir(args) => edit_command(&args.target, |ed| {
            qcowfs::cmd::guestfs::edit::mkdir(ed, &args.guest_path)
        }),
        Command::CopyIn(args) => edit_command(&args.target, |ed| {
            let (dir, sources) = args.paths.split_last().expect("clap asks for two at least");
            let sources: Vec<&std::path::Path> = sources.iter().map(|p| p.as_path()).collect();
            let r = qcowfs::cmd::guestfs::edit::copy_in(ed, &sources, dir.as_os_str())?;
            if r.skipped > 0 {
                eprintln!("qcowfs: {} entries not copied (named above)", r.skipped);
            }
            Ok(())
        }),
        Command::Seal(args) => args.confine.folders().and_then(|within| {
            let keys = args.keys.sources().key_ring(&args.image, true, &within)?;
            seal(&args, &keys, within)
        }),
    };
    match result {
        Ok(()) => std::process::exit(EXIT_OK),
        Err(e) => fail(&e),
    }
}

fn fail(e: &Error) -> ! {
    eprintln!("qcowfs: {e}");
    std::process::exit(exit_status(e));
}

/// `qcowfs info`: the key sources are read (and a bad one reported) even though describing an
/// image needs no key; with one, each layer's key is checked.
fn info(args: qcowfs::cli::InfoArgs) -> Result<()> {
    qcowfs::cmd::info::run(qcowfs::cmd::info::InfoOptions {
        json: args.json,
        passphrase: args.keys.sources().default_passphrase()?,
        backing_within: args.confine.folders()?,
        image: args.image,
    })
}

/// `qcowfs check-key`: exits 0 only when every encrypted layer's key is verified.
fn check_key(args: &qcowfs::cli::CheckKeyArgs) -> Result<()> {
    let within = args.confine.folders()?;
    let keys = args.keys.sources().key_ring(&args.image, true, &within)?;
    let opts = qcowfs::cmd::check_key::CheckKeyOptions {
        image: args.image.clone(),
        json: args.json,
        force_share: args.force_share,
        backing_within: within,
    };
    let check = qcowfs::cmd::check_key::run(&opts, &keys, &mut std::io::stdout().lock())?;
    if check.layers.iter().any(|l| l.verdict.is_wrong()) {
        std::process::exit(EXIT_WRONG_KEY);
    }
    if !check.all_verified() {
        std::process::exit(EXIT_UNVERIFIED_KEY);
    }
    Ok(())
}

/// The command line of `mount.fuse.qcowfs IMAGE MOUNTPOINT -o OPTIONS`, as `qcowfs mount` arguments.
/// Errors are one line and exit status 2 (usage), like clap's.
fn parse_helper(args: &[OsString]) -> Cli {
    match mount_helper::translate(args) {
        Ok(Invocation::Mount { args, warnings }) => {
            for w in warnings {
                eprintln!("qcowfs: warning: {w}");
            }
            Cli::try_parse_from(args).unwrap_or_else(|e| {
                // clap's message names the CLI flag; its first line says what is wrong.
                let text = e.to_string();
                let first = text.lines().next().unwrap_or_default();
                eprintln!("qcowfs: {}", first.trim_start_matches("error: "));
                std::process::exit(EXIT_USAGE);
            })
        }
        Ok(Invocation::Fake) => std::process::exit(EXIT_OK),
        Ok(Invocation::Help) => {
            print!("{}", mount_helper::usage());
            std::process::exit(EXIT_OK);
        }
        Err(e) => {
            eprintln!("qcowfs: {e}");
            std::process::exit(EXIT_USAGE);
        }
    }
}

/// The `--log-file` path made absolute (the daemon must not depend on the working directory),
/// opened once here so that a bad path is reported on the terminal, before daemonizing.
fn absolute_log_file(path: &Path) -> Result<PathBuf> {
    let abs = std::path::absolute(path).map_err(|e| Error::new(path, e))?;
    filelog::open(&abs).map_err(|e| Error::new(&abs, e))?;
    Ok(abs)
}

/// `qcowfs check`: qemu-img check with the keys; corruptions found exit 7 (a damaged image).
fn check(args: &qcowfs::cli::CheckArgs) -> Result<()> {
    use qcowfs::cmd::check::{CheckOptions, Verdict};
    let within = args.confine.folders()?;
    let keys = args.keys.sources().key_ring(&args.image, true, &within)?;
    let opts = CheckOptions {
        image: args.image.clone(),
        repair: args.repair.clone(),
        json: args.json,
        force_share: args.force_share,
        backing_within: within,
    };
    match qcowfs::cmd::check::run(&opts, &keys)? {
        Verdict::Clean => Ok(()),
        Verdict::Corrupt => std::process::exit(qcowfs::cli::EXIT_DAMAGED),
    }
}

/// Open the guest file system `args` name (the passphrase prompted for on a terminal when none is
/// given) and run `f` on it.
fn guest_command(
    args: &qcowfs::cli::GuestArgs,
    f: impl FnOnce(&qcowfs::cmd::guestfs::GuestFs) -> Result<()>,
) -> Result<()> {
    let within = args.confine.folders()?;
    let keys = args.keys.sources().key_ring(&args.image, true, &within)?;
    let opts = qcowfs::cmd::guestfs::GuestOptions {
        force_share: args.force_share,
        backing_within: within,
        partition: args.partition,
        lv: args.lv.clone(),
        subvolume: args.subvolume.clone(),
    };
    f(&qcowfs::cmd::guestfs::GuestFs::open(
        &args.image,
        &keys,
        &opts,
    )?)
}

/// Open the guest file system `target` names for changes, run `f` on it, and finish it (the
/// library's clean unmount and the image's commit) whether `f` succeeded or not: what was
/// committed is made consistent; `f`'s error comes first.
fn edit_command(
    target: &qcowfs::cli::EditTarget,
    f: impl FnOnce(&qcowfs::cmd::guestfs::edit::GuestEditor) -> Result<()>,
) -> Result<()> {
    let within = target.confine.folders()?;
    let keys = target
        .keys
        .sources()
        .key_ring(&target.image, true, &within)?;
    let opts = qcowfs::cmd::guestfs::edit::EditOptions {
        backing_within: within,
        partition: target.partition,
        lv: target.lv.clone(),
        key_policy: qcowfs::keys::check::KeyPolicy {
            force: false,
            unverified_key: target.unverified_key,
        },
    };
    let ed = qcowfs::cmd::guestfs::edit::GuestEditor::open(&target.image, &keys, &opts)?;
    let done = f(&ed);
    let finished = ed.finish();
    done.and(finished)
}

/// `qcowfs seal`, with a progress bar on a terminal when asked.
fn seal(
    args: &qcowfs::cli::SealArgs,
    keys: &qcowfs::chain::KeyRing,
    within: Vec<PathBuf>,
) -> Result<(), Error> {
    use std::io::IsTerminal;
    use std::sync::atomic::{AtomicBool, Ordering};
    // Ctrl-C (or a TERM) asks the seal to stop at the next cluster, cleanly, and say so; a
    // second one, while it cannot stop yet (a key's PBKDF2, a hung write), ends it at once, which
    // is as safe as a kill: until the last step the image keeps its backing file.
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    for signal in [libc::SIGINT, libc::SIGTERM] {
        signal_hook::flag::register_conditional_shutdown(signal, 130, stop.clone())
            .and_then(|_| signal_hook::flag::register(signal, stop.clone()))
            .map_err(|e| Error::new("signal handler", e))?;
    }
    let bar = (!args.no_progress && std::io::stderr().is_terminal()).then(|| {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} ({eta} left)")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    });
    let open = qcowfs::chain::OpenOptions {
        backing_within: within,
        ..Default::default()
    };
    let policy = qcowfs::keys::check::KeyPolicy {
        force: args.force,
        unverified_key: args.unverified_key,
    };
    let report = qcowfs::cmd::seal::seal(&args.image, keys, open, policy, &|done, total| {
        if let Some(bar) = &bar {
            bar.set_length(total);
            bar.set_position(done);
        }
        !stop.load(Ordering::Relaxed)
    });
    if let (Err(_), Some(bar)) = (&report, &bar) {
        bar.abandon();
    }
    let report = report?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    if !report.dropped_backing {
        println!(
            "{}: already self-contained (no backing file)",
            qcowfs::error::escaped(&args.image)
        );
    } else {
        println!(
            "{}: copied {} from the backing chain ({} cluster(s) that read as zeros left \
             unallocated); the image no longer has a backing file",
            qcowfs::error::escaped(&args.image),
            qcowfs::cmd::size::human(report.copied_bytes),
            report.zero_clusters
        );
    }
    Ok(())
}
