//! Gives back the memory that start-up and config changes used, once the config holds still.
//!
//! Most of an idle proxy's resident memory is code: every page of the binary it has run, and, because
//! the kernel maps up to 64 KiB around each page it faults in, much code it never ran. Start-up and
//! reloads run code that the steady state does not (argument and YAML parsing, validation, binding,
//! the first connections to routers). [`release_after_applies`] waits until a config has been applied
//! and nothing else was applied for [`SETTLE`], then [`release_and_log`] unmaps the binary's
//! read-only pages from the process (`MADV_DONTNEED`: they stay in the page cache, shared with every
//! other proxy on the node) and hands the heap's free memory back (`malloc_trim`). Code that runs
//! again comes back on first use, a minor fault from the page cache; what stays resident is what the
//! proxy keeps running.
//!
//! Only mappings of the binary that are not writable and hold no page the process wrote are dropped:
//! dropping one maps the same bytes from the page cache again. A relocated read-only mapping (RELRO:
//! written at start-up, then made read-only) holds written pages, and is never touched. The file under
//! the mapping cannot change while the proxy runs: the kernel refuses writes to a running executable
//! (ETXTBSY), and an upgrade that renames a new binary into place leaves this one's inode as it was.

use std::io;
use std::path::Path;
use std::time::Duration;

use tokio::sync::watch;

/// How long the config must hold still after an apply before memory is given back: long enough for
/// what an apply starts (listeners, connections to routers and the control plane) to be running.
pub const SETTLE: Duration = Duration::from_millis(500);

/// Calls `release` once after each burst of applies (a change of `applies`), when [`SETTLE`] has
/// passed without another; returns when the sender is gone.
pub async fn release_after_applies(mut applies: watch::Receiver<u64>, mut release: impl FnMut()) {
    while applies.changed().await.is_ok() {
        loop {
            match tokio::time::timeout(SETTLE, applies.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_closed)) => return,
                Err(_settled) => break,
            }
        }
        release();
    }
}

/// A mapping of the process, as `/proc/self/smaps` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Mapping {
    start: usize,
    end: usize,
    perms: String,
    path: String,
    /// Pages of the mapping this process wrote (copied on write): they exist nowhere else.
    anonymous_kib: u64,
    resident_kib: u64,
}

/// What a [`Release`] gives back.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Released {
    /// Resident KiB of the code and read-only data mappings that are unmapped.
    code_kib: u64,
    /// Whether the C library returned free heap memory to the kernel.
    heap_trimmed: bool,
}

/// A release worked out and the heap trimmed, the code not unmapped yet. Whatever runs after the
/// unmapping maps its code back in, and with it the rest of its 64 KiB window: so everything that can
/// (reading smaps, freeing what that took, trimming the heap, logging) runs before, and the unmapping
/// is a loop over addresses and nothing more.
#[derive(Debug)]
struct Release {
    /// Start and length of each mapping to drop.
    ranges: Vec<(usize, usize)>,
    released: Released,
}

impl Release {
    /// Reads this process's mappings, picks those to drop (see [`droppable`]) and trims the heap.
    fn plan() -> io::Result<Release> {
        let exe = std::fs::read_link("/proc/self/exe")?;
        let mappings = parse_smaps(&std::fs::read_to_string("/proc/self/smaps")?);
        let mut ranges = Vec::new();
        let mut code_kib = 0;
        for mapping in droppable(&mappings, &exe) {
            ranges.push((mapping.start, mapping.end - mapping.start));
            code_kib += mapping.resident_kib;
        }
        drop(mappings);
        Ok(Release { ranges, released: Released { code_kib, heap_trimmed: trim_heap() } })
    }

    /// Drops the planned mappings' pages from this process.
    fn unmap(self) -> io::Result<()> {
        for &(start, length) in &self.ranges {
            // SAFETY: the range is a whole mapping of this process's binary, not writable, with no
            // page the process wrote (checked by `droppable`): MADV_DONTNEED only removes its page
            // table entries, and the next access maps the same bytes from the file again. No Rust
            // reference can observe a change.
            if unsafe { libc::madvise(start as *mut libc::c_void, length, libc::MADV_DONTNEED) } != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

/// Unmaps the binary's read-only pages and trims the heap (see the module docs), logged: what is given
/// back at debug level just before the code is unmapped (`benches/startup-order.sh` waits for that line), a warning when it failed.
pub fn release_and_log() {
    let release = match Release::plan() {
        Ok(release) => release,
        Err(error) => return tracing::warn!("cannot give start-up memory back: {error}"),
    };
    tracing::debug!(released = ?release.released, "giving start-up memory back");
    if let Err(error) = release.unmap() {
        tracing::warn!("cannot give start-up memory back: {error}");
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim_heap() -> bool {
    // SAFETY: malloc_trim only walks the allocator's own free lists; it is thread-safe in glibc.
    unsafe { libc::malloc_trim(0) == 1 }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim_heap() -> bool {
    false
}

/// The mappings of `exe` that can be dropped: private, not writable, and without a page this process
/// wrote (`Anonymous`). A page that is dirty in the page cache (a binary just written) is still the
/// file's: dropping it maps the same page again on the next access.
fn droppable<'a>(mappings: &'a [Mapping], exe: &'a Path) -> impl Iterator<Item = &'a Mapping> + 'a {
    mappings.iter().filter(move |m| {
        Path::new(&m.path) == exe && !m.perms.contains('w') && m.perms.ends_with('p') && m.anonymous_kib == 0
    })
}

/// Parses `/proc/PID/smaps`: a header line per mapping (`start-end perms offset dev inode [path]`),
/// then `Key: value kB` lines.
fn parse_smaps(text: &str) -> Vec<Mapping> {
    let mut mappings: Vec<Mapping> = Vec::new();
    for line in text.lines() {
        let mut fields = line.split_whitespace();
        let Some(first) = fields.next() else { continue };
        if let Some((start, end)) = first.split_once('-')
            && let (Ok(start), Ok(end)) = (usize::from_str_radix(start, 16), usize::from_str_radix(end, 16))
        {
            let perms = fields.next().unwrap_or_default().to_string();
            // offset, device and inode; the path is the rest (it may contain spaces).
            let path = line.splitn(6, char::is_whitespace).nth(5).unwrap_or_default().trim().to_string();
            mappings.push(Mapping { start, end, perms, path, anonymous_kib: 0, resident_kib: 0 });
            continue;
        }
        let (Some(mapping), Some(kib)) =
            (mappings.last_mut(), fields.next().and_then(|v| v.parse::<u64>().ok()))
        else {
            continue;
        };
        match first {
            "Rss:" => mapping.resident_kib = kib,
            "Anonymous:" => mapping.anonymous_kib = kib,
            _ => {}
        }
    }
    mappings
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
55d0a0000000-55d0a0198000 r--p 00000000 08:01 4242 /opt/keel/proxy
Rss:                 640 kB
Private_Dirty:         0 kB
Anonymous:             0 kB
55d0a0199000-55d0a067f000 r-xp 00198000 08:01 4242 /opt/keel/proxy
Rss:                3416 kB
Shared_Dirty:          0 kB
Private_Dirty:      3416 kB
Anonymous:             0 kB
55d0a067f000-55d0a06a6000 r--p 0067d000 08:01 4242 /opt/keel/proxy
Rss:                 156 kB
Private_Dirty:       152 kB
Anonymous:           152 kB
55d0a06a6000-55d0a06ab000 rw-p 006a3000 08:01 4242 /opt/keel/proxy
Rss:                  20 kB
Private_Dirty:         4 kB
Anonymous:             4 kB
7f0000000000-7f0000021000 rw-p 00000000 00:00 0 
Rss:                  60 kB
Anonymous:            60 kB
7f0000100000-7f0000200000 r-xp 00000000 08:01 99 /usr/lib/other lib.so
Rss:                  80 kB
Private_Dirty:         0 kB
";

    #[test]
    fn parses_headers_paths_and_sizes() {
        let mappings = parse_smaps(SMAPS);
        assert_eq!(mappings.len(), 6);
        assert_eq!(mappings[1].start, 0x55d0a0199000);
        assert_eq!(mappings[1].end, 0x55d0a067f000);
        assert_eq!(mappings[1].perms, "r-xp");
        assert_eq!(mappings[1].resident_kib, 3416);
        assert_eq!(mappings[2].anonymous_kib, 152);
        assert_eq!(mappings[4].path, "");
        assert_eq!(mappings[5].path, "/usr/lib/other lib.so");
    }

    #[test]
    fn drops_only_the_binarys_clean_read_only_mappings() {
        let mappings = parse_smaps(SMAPS);
        let dropped: Vec<&str> =
            droppable(&mappings, Path::new("/opt/keel/proxy")).map(|m| m.perms.as_str()).collect();
        // The read-only data and the code; not the relocated (dirty) RELRO, the data, the heap or
        // another file's code.
        assert_eq!(dropped, ["r--p", "r-xp"]);
    }

    #[tokio::test(start_paused = true)]
    async fn releases_once_the_config_holds_still() {
        let (applies, receiver) = watch::channel(0u64);
        let (released, mut count) = watch::channel(0u32);
        let task = tokio::spawn(release_after_applies(receiver, move || released.send_modify(|n| *n += 1)));
        let settle_part = SETTLE / 5 * 4;

        applies.send_modify(|n| *n += 1);
        tokio::time::sleep(settle_part).await;
        assert_eq!(*count.borrow(), 0, "released before the config held still");
        // A second apply within SETTLE restarts the wait.
        applies.send_modify(|n| *n += 1);
        tokio::time::sleep(settle_part).await;
        assert_eq!(*count.borrow(), 0);
        tokio::time::sleep(SETTLE).await;
        assert_eq!(*count.borrow_and_update(), 1, "one release for the burst of two applies");

        // Idle: nothing more; a later apply releases again.
        tokio::time::sleep(SETTLE * 10).await;
        assert_eq!(*count.borrow(), 1);
        applies.send_modify(|n| *n += 1);
        count.changed().await.expect("released again");
        assert_eq!(*count.borrow(), 2);

        drop(applies);
        task.await.expect("ends when the proxy is gone");
    }

    #[test]
    fn a_running_process_sheds_code_and_keeps_running() {
        let release = Release::plan().expect("plan");
        assert!(release.released.code_kib > 0, "the test binary's code was resident: {release:?}");
        release.unmap().expect("release");
        // The code it dropped runs again (faulted back in from the page cache), this very function
        // among it.
        let again = Release::plan().expect("plan again");
        assert!(again.released.code_kib > 0, "{again:?}");
        again.unmap().expect("release again");
    }
}
