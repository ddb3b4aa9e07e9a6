//! Extended attributes and POSIX ACLs on the way out of a guest, as `cp -a` and GNU tar carry
//! them: set on the host copy (`fsetxattr`, `lsetxattr` for a symlink itself) and written in
//! the tar stream as PAX records — `SCHILY.xattr.NAME` for attributes, `SCHILY.acl.access` and
//! `SCHILY.acl.default` in ACL text for ACLs, the records GNU tar writes with `--xattrs --acls`
//! and reads back with them. What the host refuses (a non-root caller may not set
//! `security.*` or `trusted.*`) is counted and named once at the end, never silently dropped.

use std::collections::BTreeSet;
use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};

use super::tree::{shown, Xattr};

/// The largest value the kernel accepts (`XATTR_SIZE_MAX`): a longer one is a damaged entry.
pub(crate) const MAX_VALUE: usize = 65536;

/// The longest name (`XATTR_NAME_MAX`).
const MAX_NAME: usize = 255;

/// The most bytes of attributes one entry may have (names and values; the kernel lists at most
/// 64 KiB of names).
pub(crate) const MAX_PER_ENTRY: usize = 1 << 20;

/// `posix_acl_xattr_header.a_version`.
const ACL_XATTR_VERSION: u32 = 2;

/// An entry's id where its tag has none.
const ACL_UNDEFINED_ID: u32 = u32::MAX;

/// File capabilities: never set on a host copy, as setuid and setgid are dropped there (a
/// guest's privileged program must not become one on the host, whoever copied it); the tar
/// stream carries them, for whoever extracts it to decide.
const CAPABILITY: &[u8] = b"security.capability";

const ACL_ACCESS: &[u8] = b"system.posix_acl_access";
const ACL_DEFAULT: &[u8] = b"system.posix_acl_default";

/// One ACL entry: a POSIX tag (`ACL_USER_OBJ` 1 … `ACL_OTHER` 0x20), rwx bits, and the uid or
/// gid of a `user:` or `group:` entry.
pub(crate) struct AclEntry {
    pub tag: u16,
    pub perm: u16,
    pub id: Option<u32>,
}

/// `entries` in the kernel's `posix_acl_xattr` form.
pub(crate) fn vfs_acl(entries: impl Iterator<Item = AclEntry>) -> Vec<u8> {
    let mut out = ACL_XATTR_VERSION.to_le_bytes().to_vec();
    for e in entries {
        out.extend_from_slice(&e.tag.to_le_bytes());
        out.extend_from_slice(&e.perm.to_le_bytes());
        out.extend_from_slice(&e.id.unwrap_or(ACL_UNDEFINED_ID).to_le_bytes());
    }
    out
}

/// A `posix_acl_xattr` value in ACL text, numeric ids (`user::rw-,user:1000:r--,mask::r--`),
/// as GNU tar stores it; None for a value that is not one.
fn acl_text(value: &[u8]) -> Option<String> {
    let (version, entries) = value.split_first_chunk::<4>()?;
    if u32::from_le_bytes(*version) != ACL_XATTR_VERSION || entries.len() % 8 != 0 {
        return None;
    }
    let mut parts = Vec::new();
    for e in entries.chunks_exact(8) {
        let tag = u16::from_le_bytes([e[0], e[1]]);
        let perm = u16::from_le_bytes([e[2], e[3]]);
        let id = u32::from_le_bytes([e[4], e[5], e[6], e[7]]);
        let who = match tag {
            0x01 => "user:".to_string(),
            0x02 => format!("user:{id}"),
            0x04 => "group:".to_string(),
            0x08 => format!("group:{id}"),
            0x10 => "mask:".to_string(),
            0x20 => "other:".to_string(),
            _ => return None,
        };
        let bit = |b: u16, c: char| if perm & b != 0 { c } else { '-' };
        parts.push(format!(
            "{who}:{}{}{}",
            bit(4, 'r'),
            bit(2, 'w'),
            bit(1, 'x')
        ));
    }
    Some(parts.join(","))
}

/// Whether `attrs` fit the kernel's bounds: every name and value, and all of them together.
pub(crate) fn within_bounds(attrs: &[Xattr]) -> bool {
    let total: usize = attrs.iter().map(|a| a.name.len() + a.value.len()).sum();
    total <= MAX_PER_ENTRY
        && attrs.iter().all(|a| {
            !a.name.is_empty()
                && a.name.len() <= MAX_NAME
                && !a.name.contains(&0)
                && a.value.len() <= MAX_VALUE
        })
}

/// One PAX record, `LEN KEY=VALUE\n`, LEN counting the whole record with its own digits.
fn pax_record(out: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    let rest = 1 + key.len() + 1 + value.len() + 1;
    let mut len = rest + 1;
    while len != rest + len.to_string().len() {
        len = rest + len.to_string().len();
    }
    out.extend_from_slice(len.to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(key);
    out.push(b'=');
    out.extend_from_slice(value);
    out.push(b'\n');
}

/// The PAX records that carry `attrs` in a tar stream (empty when there are none).
pub(crate) fn pax_records(attrs: &[Xattr]) -> Vec<u8> {
    let mut out = Vec::new();
    for a in attrs {
        let acl = match a.name.as_slice() {
            ACL_ACCESS => Some(&b"SCHILY.acl.access"[..]),
            ACL_DEFAULT => Some(&b"SCHILY.acl.default"[..]),
            _ => None,
        };
        match (acl, acl.and_then(|_| acl_text(&a.value))) {
            (Some(key), Some(text)) => pax_record(&mut out, key, text.as_bytes()),
            _ => {
                // GNU tar's encoding of the name in the keyword: '%' and '=' as %25 and %3D.
                let mut key = b"SCHILY.xattr.".to_vec();
                for &c in &a.name {
                    match c {
                        b'%' => key.extend_from_slice(b"%25"),
                        b'=' => key.extend_from_slice(b"%3D"),
                        c => key.push(c),
                    }
                }
                pax_record(&mut out, &key, &a.value);
            }
        }
    }
    out
}

/// Attributes the host would not take: how many, their names (a few), and the first reason.
#[derive(Default)]
pub(crate) struct Unkept {
    pub count: u64,
    pub names: BTreeSet<String>,
    pub reason: Option<std::io::Error>,
    /// File capabilities left off on purpose (see [`CAPABILITY`]).
    pub capabilities: u64,
}

/// Names listed in the closing note: enough to say what was lost.
const NAMES_SHOWN: usize = 8;

impl Unkept {
    fn add(&mut self, name: &[u8], e: std::io::Error) {
        self.count += 1;
        if self.names.len() < NAMES_SHOWN {
            self.names.insert(shown(name));
        }
        self.reason.get_or_insert(e);
    }

    /// The closing notes: file capabilities left off, attributes the host refused.
    pub fn notes(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.capabilities > 0 {
            out.push(format!(
                "the file capabilities (security.capability) of {} files were not set on the \
                 copy, as setuid bits are not: a tar stream (DEST -) carries them",
                self.capabilities
            ));
        }
        out.extend(self.refused());
        out
    }

    fn refused(&self) -> Option<String> {
        let reason = self.reason.as_ref()?;
        let names: Vec<&str> = self.names.iter().map(String::as_str).collect();
        let hint = match reason.raw_os_error() {
            Some(libc::EPERM) => " (run as root to keep them)",
            Some(libc::EOPNOTSUPP) => " (the destination's file system has no such attributes)",
            _ => "",
        };
        Some(format!(
            "{} extended attributes or ACLs not kept ({}): {reason}{hint}",
            self.count,
            names.join(", ")
        ))
    }
}

/// Set `attrs` on the open file or folder `fd`; what the host refuses goes to `unkept`.
pub(crate) fn set_on_fd(fd: &impl AsRawFd, attrs: &[Xattr], unkept: &mut Unkept) {
    for a in attrs {
        if a.name == CAPABILITY {
            unkept.capabilities += 1;
            continue;
        }
        let Ok(name) = CString::new(a.name.clone()) else {
            continue;
        };
        // SAFETY: fd is open, name a valid C string, the value a live slice of its length.
        let rc = unsafe {
            libc::fsetxattr(
                fd.as_raw_fd(),
                name.as_ptr(),
                a.value.as_ptr().cast(),
                a.value.len(),
                0,
            )
        };
        if rc != 0 {
            unkept.add(&a.name, std::io::Error::last_os_error());
        }
    }
}

/// Set `attrs` on the symlink `name` in folder `dir` itself, never on what it points to.
pub(crate) fn set_on_link(dir: &OwnedFd, name: &[u8], attrs: &[Xattr], unkept: &mut Unkept) {
    if attrs.is_empty() {
        return;
    }
    // The link named below the folder's descriptor: no path the guest chose is resolved on the
    // host but `name`, one component, and lsetxattr does not follow it.
    let mut path = format!("/proc/self/fd/{}/", dir.as_raw_fd()).into_bytes();
    path.extend_from_slice(name);
    let Ok(path) = CString::new(path) else {
        return;
    };
    for a in attrs {
        let Ok(attr) = CString::new(a.name.clone()) else {
            continue;
        };
        // SAFETY: both are valid C strings, the value a live slice of its length.
        let rc = unsafe {
            libc::lsetxattr(
                path.as_ptr(),
                attr.as_ptr(),
                a.value.as_ptr().cast(),
                a.value.len(),
                0,
            )
        };
        if rc != 0 {
            unkept.add(&a.name, std::io::Error::last_os_error());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{acl_text, pax_records, vfs_acl, within_bounds, AclEntry, Xattr};

    fn entry(tag: u16, perm: u16, id: Option<u32>) -> AclEntry {
        AclEntry { tag, perm, id }
    }

    #[test]
    fn an_acl_reads_as_getfacl_writes_it_with_numeric_ids() {
        let acl = vfs_acl(
            [
                entry(1, 6, None),
                entry(2, 4, Some(1000)),
                entry(4, 4, None),
                entry(8, 7, Some(27)),
                entry(0x10, 5, None),
                entry(0x20, 0, None),
            ]
            .into_iter(),
        );
        assert_eq!(acl.len(), 4 + 6 * 8);
        assert_eq!(
            acl_text(&acl).unwrap(),
            "user::rw-,user:1000:r--,group::r--,group:27:rwx,mask::r-x,other::---"
        );
        assert_eq!(acl_text(&acl[..acl.len() - 1]), None);
        assert_eq!(acl_text(b"\x01\0\0\0"), None);
    }

    #[test]
    fn pax_records_count_their_own_length() {
        let attrs = [
            Xattr {
                name: b"user.k".to_vec(),
                value: b"v".to_vec(),
            },
            Xattr {
                name: b"system.posix_acl_access".to_vec(),
                value: vfs_acl(
                    [entry(1, 7, None), entry(4, 5, None), entry(0x20, 4, None)].into_iter(),
                ),
            },
        ];
        let records = pax_records(&attrs);
        let text = String::from_utf8(records).unwrap();
        let mut lines = text.lines();
        for line in [lines.next().unwrap(), lines.next().unwrap()] {
            let (len, _) = line.split_once(' ').unwrap();
            assert_eq!(len.parse::<usize>().unwrap(), line.len() + 1, "{line}");
        }
        assert!(text.contains(" SCHILY.xattr.user.k=v\n"), "{text}");
        let odd = [Xattr {
            name: b"user.a=b%c".to_vec(),
            value: b"v".to_vec(),
        }];
        let r = String::from_utf8(pax_records(&odd)).unwrap();
        assert!(r.ends_with(" SCHILY.xattr.user.a%3Db%25c=v\n"), "{r}");
        assert!(text.contains(" SCHILY.acl.access=user::rwx,group::r-x,other::r--\n"));
        // A record whose length crosses a power of ten counts its extra digit.
        let long = [Xattr {
            name: b"user.x".to_vec(),
            value: vec![b'a'; 76],
        }];
        let r = pax_records(&long);
        assert_eq!(r.len(), 101);
        assert!(r.starts_with(b"101 "));
    }

    #[test]
    fn attributes_beyond_the_kernels_bounds_are_refused() {
        let a = |name: &[u8], len: usize| Xattr {
            name: name.to_vec(),
            value: vec![1; len],
        };
        assert!(within_bounds(&[a(b"user.a", 65536)]));
        assert!(!within_bounds(&[a(b"user.a", 65537)]));
        assert!(!within_bounds(&[a(b"", 1)]));
        assert!(!within_bounds(&[a(b"user.\0", 1)]));
        assert!(!within_bounds(&[a(&[b'u'; 256], 1)]));
        let many: Vec<Xattr> = (0..20).map(|_| a(b"user.a", 65536)).collect();
        assert!(!within_bounds(&many));
    }
}
