//! contrib/ansible: the fleet audit playbook, run by ansible-core from PyPI (pinned, installed
//! once into a venv under the target folder) over an inventory whose compute hosts all use
//! `ansible_connection=local`, each with its own nova-like tree made by qemu-img and qemu-io. The
//! merged report's numbers per host and in total are checked against what the test built and
//! what `qemu-img map` says each disk's base provides; then the check mode (a limit one host is
//! over fails the run naming that host; limits nobody is over pass) and a host whose audit fails
//! with a usage error (the run fails, the report still covers the others and names it).
//!
//! Each test prints the commands it ran (shown on failure: the steps to reproduce).

use crate::common;

use common::*;
use serde_json::Value;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

/// The ansible-core the playbook is tested with: 2.17 runs on the controller's Python 3.10 to
/// 3.12 (Ubuntu 22.04 to Debian 12 and later).
const ANSIBLE_CORE: &str = "2.17.14";

/// How long one `ansible-playbook` run (three hosts, a few disks each) may take.
const PLAYBOOK_TIMEOUT: Duration = Duration::from_secs(300);

const PASS: &str = "fleet secret";

/// The playbook and its merge script, in this checkout.
fn playbook() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/ansible/fleet-audit.yml")
}

/// A venv holding the pinned ansible-core, made once per target folder: `installed` is written
/// only after pip succeeded, so a venv a killed run left half made is made again.
fn ansible_venv() -> &'static Path {
    static VENV: OnceLock<PathBuf> = OnceLock::new();
    VENV.get_or_init(|| {
        let venv =
            Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("ansible-core-{ANSIBLE_CORE}"));
        let stamp = venv.join("installed");
        if fs::read_to_string(&stamp).ok().as_deref() != Some(ANSIBLE_CORE) {
            let _ = fs::remove_dir_all(&venv);
            run_ok(
                "python3",
                ["-m".as_ref(), "venv".as_ref(), venv.as_os_str()],
            );
            run_with(
                Command::new(venv.join("bin/pip")).args([
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                    &format!("ansible-core=={ANSIBLE_CORE}"),
                ]),
                None,
                Duration::from_secs(600),
            )
            .assert_success();
            fs::write(&stamp, ANSIBLE_CORE).expect("write the venv's stamp");
        }
        venv
    })
}

/// A nova instances folder on a pretend compute host: `_base/` with raw bases, `UUID/disk`.
struct Tree {
    instances: PathBuf,
}

impl Tree {
    fn new(dir: &Path) -> Tree {
        let instances = dir.join("instances");
        fs::create_dir_all(instances.join("_base")).expect("mkdir _base");
        Tree { instances }
    }

    /// A raw base `_base/NAME` of 64 MiB holding `(offset, length)` of data.
    fn base(&self, name: &str, data: &[(u64, u64)]) -> Image {
        let base = create_raw(self.instances.join("_base").join(name), 64 * MIB);
        for &(off, len) in data {
            base.write_pattern(off, len, 0x42);
        }
        base
    }

    /// `UUID/disk`: a 64 MiB qcow2 (AES, LUKS or plain), over `base` as nova names it, with
    /// `(offset, length)` of its own data.
    fn disk(&self, uuid: &str, enc: &str, base: Option<&Image>, data: &[(u64, u64)]) -> Image {
        let folder = self.instances.join(uuid);
        fs::create_dir_all(&folder).expect("mkdir instance");
        let mut builder = qcow2(folder.join("disk"), 64 * MIB);
        if let Some(base) = base {
            let name = base.path.file_name().unwrap().to_str().unwrap();
            builder = builder.backing_named(base, &format!("../_base/{name}"));
        }
        let image = match enc {
            "aes" => builder.aes(PASS),
            "luks" => builder.luks(PASS),
            _ => builder,
        }
        .create();
        for &(off, len) in data {
            image.write_pattern(off, len, 0x55);
        }
        image
    }

    /// `UUID/disk` that is no image: its row says why and the audit exits 1.
    fn garbage(&self, uuid: &str) {
        let folder = self.instances.join(uuid);
        fs::create_dir_all(&folder).expect("mkdir instance");
        fs::write(folder.join("disk"), b"not a disk image\n".repeat(64)).expect("write garbage");
    }
}

/// What one host's report must say, from what the test built.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
struct Counts {
    disks: u64,
    unaudited: u64,
    encrypted: u64,
    leaning: u64,
    plaintext: u64,
    base_plaintext: u64,
}

impl Counts {
    /// Adds a disk: the guest data its base provides is what `qemu-img map` finds at depth 1.
    fn disk(&mut self, image: &Image) {
        self.disks += 1;
        if !image.encrypted() {
            return;
        }
        self.encrypted += 1;
        let from_base: u64 = qemu_map(image)
            .iter()
            .filter(|e| e["data"] == true && e["depth"] == 1)
            .map(|e| e["length"].as_u64().expect("length"))
            .sum();
        if from_base > 0 {
            self.leaning += 1;
            self.plaintext += from_base;
        }
    }

    /// Adds a base that encrypted instances use: its plaintext is its allocated size.
    fn base(&mut self, base: &Image) {
        self.base_plaintext += base.qemu_info()["actual-size"]
            .as_u64()
            .expect("actual-size");
    }

    fn of(report: &Value) -> Counts {
        let n = |key: &str| {
            report[key]
                .as_u64()
                .unwrap_or_else(|| panic!("no {key} in {report:#}"))
        };
        Counts {
            disks: n("disks"),
            unaudited: n("unaudited_disks"),
            encrypted: n("encrypted_disks"),
            leaning: n("leaning_disks"),
            plaintext: n("plaintext_bytes"),
            base_plaintext: n("base_plaintext_bytes"),
        }
    }

    fn plus(self, o: Counts) -> Counts {
        Counts {
            disks: self.disks + o.disks,
            unaudited: self.unaudited + o.unaudited,
            encrypted: self.encrypted + o.encrypted,
            leaning: self.leaning + o.leaning,
            plaintext: self.plaintext + o.plaintext,
            base_plaintext: self.base_plaintext + o.base_plaintext,
        }
    }
}

/// The fleet: hostA (two AES disks leaning on a base, a plain one on it, a LUKS one alone),
/// hostB (a LUKS disk leaning on its base, an AES one alone, a garbage disk) and hostC (no
/// instances), in folders of `dir`.
struct Fleet {
    a: Tree,
    b: Tree,
    c: Tree,
    want_a: Counts,
    want_b: Counts,
    garbage_b: PathBuf,
}

fn fleet(dir: &Path) -> Fleet {
    let a = Tree::new(&dir.join("hostA"));
    let base_a = a.base("b1", &[(0, 4 * MIB), (32 * MIB, 2 * MIB)]);
    let mut want_a = Counts::default();
    // One writes beside its base's data, one over part of it (hiding 1 MiB of it).
    want_a.disk(&a.disk("aaaa-1", "aes", Some(&base_a), &[(8 * MIB, MIB)]));
    want_a.disk(&a.disk("aaaa-2", "aes", Some(&base_a), &[(0, MIB)]));
    want_a.disk(&a.disk("aaaa-3", "none", Some(&base_a), &[(MIB, MIB)]));
    want_a.disk(&a.disk("aaaa-4", "luks", None, &[(0, 2 * MIB)]));
    want_a.base(&base_a);

    let b = Tree::new(&dir.join("hostB"));
    let base_b = b.base("b2", &[(16 * MIB, MIB)]);
    let mut want_b = Counts::default();
    want_b.disk(&b.disk("bbbb-1", "luks", Some(&base_b), &[(0, MIB)]));
    want_b.disk(&b.disk("bbbb-2", "aes", None, &[(0, MIB)]));
    b.garbage("bbbb-3");
    want_b.disks += 1;
    want_b.unaudited += 1;
    want_b.base(&base_b);

    let c = Tree::new(&dir.join("hostC"));
    assert_eq!(
        (want_a.leaning, want_b.leaning),
        (2, 1),
        "the fleet is as planned: {want_a:?} {want_b:?}"
    );
    assert!(want_a.plaintext > want_b.plaintext && want_b.plaintext > 0);
    Fleet {
        a,
        b,
        c,
        want_a,
        want_b,
        garbage_b: dir.join("hostB/instances/bbbb-3/disk"),
    }
}

/// An inventory: `localhost` (the controller, audited by nobody), the compute group with one
/// entry per tree, and `extra` lines for the group.
fn inventory(dir: &Path, fleet: &Fleet, extra: &str) -> PathBuf {
    let host = |name: &str, tree: &Tree| {
        format!(
            "{name} ansible_connection=local qcowfs_audit_paths={}\n",
            tree.instances.display()
        )
    };
    let text = format!(
        "localhost ansible_connection=local\n\n[compute]\n{}{}{}{extra}\n[all:vars]\n\
         ansible_python_interpreter=\"{{{{ ansible_playbook_python }}}}\"\n",
        host("hostA", &fleet.a),
        host("hostB", &fleet.b),
        host("hostC", &fleet.c),
    );
    let path = dir.join("inventory.ini");
    fs::write(&path, text).expect("write inventory");
    path
}

/// `ansible-playbook -i INVENTORY fleet-audit.yml -e qcowfs_bin=... -e qcowfs_report_dir=REPORT
/// -e EXTRA...`, in `dir` with Ansible's own files there too (no ~/.ansible, no ansible.cfg but
/// an empty one).
fn playbook_run(dir: &Path, inventory: &Path, report: &Path, extra: &[&str]) -> Run {
    let venv = ansible_venv();
    let home = dir.join("ansible-home");
    fs::create_dir_all(&home).expect("mkdir ansible home");
    let config = dir.join("ansible.cfg");
    fs::write(&config, "").expect("write ansible.cfg");
    let mut cmd = Command::new(venv.join("bin/ansible-playbook"));
    cmd.arg("-i")
        .arg(inventory)
        .arg(playbook())
        .arg("-e")
        .arg(format!("qcowfs_bin={}", qcowfs_bin().display()))
        .arg("-e")
        .arg(format!("qcowfs_report_dir={}", report.display()));
    for e in extra {
        cmd.args(["-e", e]);
    }
    cmd.current_dir(dir)
        .env("ANSIBLE_CONFIG", &config)
        .env("ANSIBLE_HOME", &home)
        .env("ANSIBLE_LOCAL_TEMP", home.join("tmp"))
        .env("ANSIBLE_REMOTE_TMP", home.join("tmp"))
        .env("ANSIBLE_NOCOLOR", "1")
        .env("LC_ALL", "C.UTF-8");
    run_with(&mut cmd, None, PLAYBOOK_TIMEOUT)
}

fn fleet_json(report: &Path) -> Value {
    let path = report.join("fleet.json");
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_json::from_str(&text).expect("fleet.json parses")
}

fn output(r: &Run) -> String {
    format!("{}{}", r.stdout_str(), r.stderr)
}

#[test]
fn the_playbook_merges_every_compute_hosts_audit_and_its_limits_fail_the_host_over_them() {
    let dir = workdir();
    let fleet = fleet(dir.path());
    let inventory = inventory(dir.path(), &fleet, "");
    let report = dir.path().join("report");

    // No limit: the report, whatever it says.
    let r = playbook_run(dir.path(), &inventory, &report, &[]);
    r.assert_success();
    let all = fleet_json(&report);
    let hosts = all["hosts"].as_object().expect("hosts");
    let names: Vec<&str> = hosts.keys().map(String::as_str).collect();
    assert_eq!(names, ["hostA", "hostB", "hostC"], "{all:#}");
    assert_eq!(Counts::of(&all["hosts"]["hostA"]), fleet.want_a, "{all:#}");
    assert_eq!(Counts::of(&all["hosts"]["hostB"]), fleet.want_b, "{all:#}");
    assert_eq!(
        Counts::of(&all["hosts"]["hostC"]),
        Counts::default(),
        "{all:#}"
    );
    assert_eq!(
        Counts::of(&all["total"]),
        fleet.want_a.plus(fleet.want_b),
        "{all:#}"
    );
    assert_eq!(all["total"]["hosts"], 3, "{all:#}");
    assert_eq!(all["missing_hosts"], serde_json::json!([]), "{all:#}");
    // hostB's audit exited 1 (the garbage disk): its rows are all there, the bad one named.
    let unaudited = &all["hosts"]["hostB"]["unaudited"];
    assert_eq!(
        unaudited[0]["path"],
        fleet.garbage_b.to_str().unwrap(),
        "{all:#}"
    );
    assert_eq!(
        unaudited[0]["error"],
        "not a qcow2 image (bad magic); a raw disk needs no qcowfs (mount -o loop)",
        "{all:#}"
    );
    // Each host's JSON Lines are kept, as `qcowfs audit --json` printed them.
    let lines = fs::read_to_string(report.join("hosts/hostA.jsonl")).expect("hostA.jsonl");
    assert_eq!(lines.lines().count(), 5, "4 disks and 1 base:\n{lines}");
    let text = fs::read_to_string(report.join("fleet.txt")).expect("fleet.txt");
    let row = |name: &str| -> Vec<String> {
        let line = text
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("no row for {name}:\n{text}"));
        line.split_whitespace().map(str::to_string).collect()
    };
    assert_eq!(row("hostA")[1..4], ["4", "3", "2"], "{text}");
    assert_eq!(row("hostB")[1..4], ["3", "2", "1"], "{text}");
    assert_eq!(row("hostB")[6], "1", "{text}");
    assert_eq!(row("total")[1..4], ["7", "5", "3"], "{text}");
    assert!(text.contains("hostB: not audited: "), "{text}");
    assert!(
        r.stdout_str().contains("HOST"),
        "the run shows the table:\n{}",
        output(&r)
    );

    // Limits hostA is over (its leaning disks, its plaintext) and hostB is not: the run fails
    // naming hostA, and only hostA.
    let plaintext_limit = format!("qcowfs_max_plaintext_bytes={}", fleet.want_b.plaintext);
    let r = playbook_run(
        dir.path(),
        &inventory,
        &report,
        &["qcowfs_max_leaning_disks=1", &plaintext_limit],
    );
    assert!(!r.status.success(), "over a limit, yet:\n{}", output(&r));
    let out = output(&r);
    let failure = format!(
        "fatal: [hostA]: FAILED! => {{\"changed\": false, \"msg\": \"qcowfs fleet check failed: \
         hostA: encrypted disks leaning on plaintext bases: 2, over the limit of 1; \
         hostA: bytes of their guest data in plaintext bases: {}, over the limit of {}\"}}",
        fleet.want_a.plaintext, fleet.want_b.plaintext
    );
    assert!(out.contains(&failure), "{failure}\nnot in:\n{out}");
    assert_eq!(
        out.matches("fatal: ").count(),
        1,
        "only hostA fails:\n{out}"
    );
    let over = fleet_json(&report)["over_limits"].clone();
    let over_hosts: Vec<&str> = over
        .as_array()
        .expect("over_limits")
        .iter()
        .map(|o| o["host"].as_str().unwrap())
        .collect();
    assert_eq!(over_hosts, ["hostA", "hostA"], "{over:#}");

    // Limits nobody is over: the run passes and says so.
    let plaintext_limit = format!("qcowfs_max_plaintext_bytes={}", fleet.want_a.plaintext);
    let r = playbook_run(
        dir.path(),
        &inventory,
        &report,
        &[
            "qcowfs_max_leaning_disks=2",
            &plaintext_limit,
            "qcowfs_max_unaudited_disks=1",
        ],
    );
    r.assert_success();
    assert!(
        r.stdout_str()
            .contains("every host is within the limits (3 hosts)"),
        "{}",
        output(&r)
    );
    assert_eq!(fleet_json(&report)["over_limits"], serde_json::json!([]));
}

#[test]
fn a_host_whose_audit_fails_fails_the_run_and_the_report_names_it_beside_the_others() {
    let dir = workdir();
    let fleet = fleet(dir.path());
    // hostD's qcowfs is given an option it does not know: exit status 2, a usage error.
    let inventory = inventory(
        dir.path(),
        &fleet,
        "hostD ansible_connection=local qcowfs_audit_paths=/nonexistent \
         qcowfs_audit_options='[\"--no-such-option\"]'\n",
    );
    let report = dir.path().join("report");
    let r = playbook_run(dir.path(), &inventory, &report, &[]);
    assert!(!r.status.success(), "hostD failed, yet:\n{}", output(&r));
    assert!(r.stdout_str().contains("hostD"), "{}", output(&r));
    let all = fleet_json(&report);
    assert_eq!(
        all["missing_hosts"],
        serde_json::json!(["hostD"]),
        "{all:#}"
    );
    assert_eq!(Counts::of(&all["hosts"]["hostA"]), fleet.want_a, "{all:#}");
    assert_eq!(all["total"]["hosts"], 3, "{all:#}");
    let text = fs::read_to_string(report.join("fleet.txt")).expect("fleet.txt");
    assert!(
        text.contains("hostD: no audit (its task failed or it was unreachable)"),
        "{text}"
    );
    // The run shows why hostD failed.
    let out = output(&r);
    assert!(out.contains("fatal: [hostD]: FAILED!"), "{out}");
    assert!(out.contains("--no-such-option"), "{out}");
    assert_eq!(
        out.matches("fatal: ").count(),
        1,
        "only hostD fails:\n{out}"
    );

    // With a limit, a host without an audit fails the check, here run by hand on the files
    // the playbook kept: all hosts are within the limit, hostD has no file.
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/ansible/fleet_report.py");
    let r = run(
        "python3",
        [
            script.as_os_str(),
            "--expect=hostA,hostB,hostC,hostD".as_ref(),
            "--max-leaning-disks=9".as_ref(),
            report.join("hosts").as_os_str(),
        ],
    );
    assert_eq!(r.status.code(), Some(3), "{}", output(&r));
    assert_eq!(
        r.stderr,
        "hostD: no audit (its task failed or it was unreachable)\n"
    );
}
