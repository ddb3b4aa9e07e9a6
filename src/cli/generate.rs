//! `qcowfs generate`: manual pages and shell completions made from the clap definitions, so they
//! cannot drift from `--help`. Hidden from `--help`; `scripts/install.sh` runs it.

use std::path::{Path, PathBuf};

use clap::{CommandFactory, Subcommand};
use clap_complete::Shell;
use clap_mangen::roff::{bold, roman, Roff};
use clap_mangen::Man;

use super::mount_helper::{option_help, HELPER_NAME};
use super::{Cli, LIBVIRT_SECRETS_DIR, LIBVIRT_SECRETS_DIR_ENV};
use crate::error::{Error, Result};

/// What to generate.
#[derive(Debug, Subcommand)]
pub enum Target {
    /// Write qcowfs.1 and one page per command (qcowfs-mount.1, ...) into DIR
    Man {
        /// An existing folder, e.g. /usr/local/share/man/man1
        dir: PathBuf,
    },
    /// Print the completion script for SHELL on stdout
    Completions {
        /// bash, zsh, fish, elvish or powershell
        #[arg(value_enum)]
        shell: Shell,
    },
}

pub fn run(target: &Target) -> Result<()> {
    match target {
        Target::Man { dir } => write_man_pages(dir).map(|_| ()),
        Target::Completions { shell } => {
            clap_complete::generate(
                *shell,
                &mut Cli::command(),
                "qcowfs",
                &mut std::io::stdout(),
            );
            Ok(())
        }
    }
}

/// Writes `qcowfs.1` and `qcowfs-COMMAND.1` for every visible command into `dir`; returns the files.
pub fn write_man_pages(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut cmd = Cli::command().disable_help_subcommand(true);
    // Building names each subcommand "qcowfs-mount" etc., which becomes its page's title.
    cmd.build();
    let mut pages = vec![(cmd.clone(), Vec::new())];
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let extra = if sub.get_name() == "mount" {
            mount_helper_section()
        } else {
            Vec::new()
        };
        pages.push((sub.clone(), extra));
    }
    let mut written = Vec::new();
    for (page, extra) in pages {
        let man = Man::new(page.clone()).manual("qcowfs manual");
        let path = dir.join(man.get_filename());
        let mut text = Vec::new();
        render(&man, &page, &extra, &mut text).map_err(|e| Error::new(&path, e))?;
        std::fs::write(&path, text).map_err(|e| Error::new(&path, e))?;
        written.push(path);
    }
    Ok(written)
}

/// One page: clap's sections, then the after-help text as NOTES, then what every page states.
fn render(
    man: &Man,
    cmd: &clap::Command,
    extra: &[Roff],
    w: &mut dyn std::io::Write,
) -> std::io::Result<()> {
    man.render_title(w)?;
    man.render_name_section(w)?;
    man.render_synopsis_section(w)?;
    man.render_description_section(w)?;
    if cmd.get_arguments().any(|a| !a.is_hide_set()) {
        man.render_options_section(w)?;
    }
    if cmd.has_subcommands() {
        man.render_subcommands_section(w)?;
    }
    if let Some(notes) = cmd.get_after_long_help().or_else(|| cmd.get_after_help()) {
        preformatted("NOTES", &notes.to_string()).to_writer(w)?;
    }
    for section in extra {
        section.to_writer(w)?;
    }
    common_sections().to_writer(w)?;
    if cmd.get_version().is_some() {
        man.render_version_section(w)?;
    }
    Ok(())
}

/// A section whose text keeps its line breaks (examples, command lines).
fn preformatted(heading: &str, text: &str) -> Roff {
    let mut roff = Roff::new();
    roff.control("SH", [heading]).control("nf", []);
    for line in text.lines() {
        roff.text([roman(line)]);
    }
    roff.control("fi", []);
    roff
}

/// The mount(8) helper and its `-o` options, from the table the helper itself uses.
fn mount_helper_section() -> Vec<Roff> {
    let mut roff = Roff::new();
    roff.control("SH", ["MOUNT(8) AND FSTAB"])
        .text([roman(format!(
        "Installed as /sbin/{HELPER_NAME} (a symbolic link to qcowfs), the command is the mount \
         helper for the file system type fuse.qcowfs: mount(8) runs it as \
         \"{HELPER_NAME} IMAGE MOUNTPOINT -o OPTIONS\". Options naming qcowfs flags are mapped \
         to them; the generic options mount(8) passes (defaults, rw, dev, suid, exec, auto, \
         user, _netdev, nofail, x-*, ...) are accepted and ignored; any other option is an error \
         unless mount is run with -s (sloppy)."
    ))]);
    for (name, help) in option_help() {
        roff.control("TP", [])
            .text([bold(name)])
            .text([roman(help)]);
    }
    let fstab = "/var/lib/nova/instances/UUID/disk  /mnt/vm  fuse.qcowfs  \
                 ro,passphrase_file=/root/key,nofail  0 0";
    roff.control("PP", [])
        .text([roman("An /etc/fstab line:")])
        .control("nf", [])
        .text([roman(fstab)])
        .control("fi", []);
    vec![roff]
}

/// EXIT STATUS, ENVIRONMENT, FILES and SEE ALSO, the same on every page.
fn common_sections() -> Roff {
    let mut roff = Roff::new();
    roff.control("SH", ["EXIT STATUS"]);
    for (code, meaning) in super::EXIT_STATUSES {
        roff.control("TP", [])
            .text([bold(code.to_string())])
            .text([roman(meaning)]);
    }
    roff.control("SH", ["ENVIRONMENT"])
        .control("TP", [])
        .text([bold("RUST_LOG")])
        .text([roman(
            "Log level (error, warn, info, debug, trace); overrides -v.",
        )])
        .control("TP", [])
        .text([bold(LIBVIRT_SECRETS_DIR_ENV)])
        .text([roman(format!(
            "For tests: where --libvirt-secret looks instead of {LIBVIRT_SECRETS_DIR}."
        ))]);
    roff.control("SH", ["FILES"])
        .control("TP", [])
        .text([bold(format!("{LIBVIRT_SECRETS_DIR}/UUID.base64"))])
        .text([roman(
            "The value of libvirt secret UUID, read by --libvirt-secret.",
        )])
        .control("TP", [])
        .text([bold("/run/qcowfs/")])
        .text([roman(
            "One record per mount (daemon pid, final status); $XDG_RUNTIME_DIR/qcowfs/ for \
             other users than root.",
        )]);
    roff.control("SH", ["SEE ALSO"]).text([roman(
        "qcowfs(1), qcowfs-mount(1), qcowfs-umount(1), qcowfs-info(1), qcowfs-audit(1), mount(8), fstab(5), \
         qemu-img(1), virsh(1)",
    )]);
    roff
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn man_pages_name_every_command_and_the_exit_statuses() {
        let dir = tempfile::tempdir().unwrap();
        let files = write_man_pages(dir.path()).unwrap();
        let names: Vec<String> = files
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        for want in [
            "qcowfs.1",
            "qcowfs-mount.1",
            "qcowfs-umount.1",
            "qcowfs-info.1",
            "qcowfs-audit.1",
        ] {
            assert!(names.iter().any(|n| n == want), "{want} missing: {names:?}");
        }
        assert!(!names.iter().any(|n| n.contains("generate")), "{names:?}");
        let main = std::fs::read_to_string(dir.path().join("qcowfs.1")).unwrap();
        assert!(main.contains("EXIT STATUS"));
        let mount = std::fs::read_to_string(dir.path().join("qcowfs-mount.1")).unwrap();
        assert!(mount.contains("passphrase_file"), "{mount}");
        assert!(mount.contains("libvirt\\-secret"), "{mount}");
    }
}
