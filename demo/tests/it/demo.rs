//! The first run, as a newcomer has it: start `keel-demo`, then run the commands it prints (dig and
//! curl, for real) and check what they show; then Ctrl-C.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A loopback address and VIP range of this run's own, so that fixed demo ports never collide with
/// anything else on the machine.
fn private_loopback() -> (String, String) {
    let seed = std::process::id()
        ^ std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    let second = 100 + (seed % 100) as u8;
    let third = ((seed >> 8) % 200) as u8;
    (format!("127.{second}.{third}.1"), format!("127.{second}.{}.0/24", third + 1))
}

fn demo(host: &str, vip_range: &str) -> Child {
    Command::new(env!("CARGO_BIN_EXE_keel-demo"))
        .args(["--host", host, "--base-port", "20000", "--vip-range", vip_range, "--dns-upstream", "none"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("keel-demo starts")
}

/// Runs a printed command line with sh: its standard output when it succeeded, else what it said.
fn run_line(line: &str) -> Result<String, String> {
    let output = Command::new("sh").args(["-c", line]).output().expect("sh runs");
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(format!("{:?}: {}", output.status, String::from_utf8_lossy(&output.stderr)))
    }
}

fn shell(line: &str) -> String {
    run_line(line).unwrap_or_else(|problem| panic!("{line}: {problem}"))
}

/// Runs `line` until its output contains `expected` (within five seconds).
fn eventually(line: &str, expected: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let output = run_line(line);
        if output.as_ref().is_ok_and(|output| output.contains(expected)) {
            return;
        }
        assert!(Instant::now() < deadline, "{line}: no {expected:?} in\n{output:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Kills the demo if the test ends early, so that it never outlives the test (it holds the test's
/// standard error open).
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn interrupt(child: &Child) {
    // SAFETY: kill(2) with a child's pid and a signal number has no memory effects.
    let pid = i32::try_from(child.id()).expect("a pid fits in i32");
    assert_eq!(unsafe { libc::kill(pid, libc::SIGINT) }, 0);
}

fn wait_exit(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("keel-demo did not exit within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_printed_commands_work_and_ctrl_c_stops_it() {
    let (host, vip_range) = private_loopback();
    let mut running = Running(demo(&host, &vip_range));
    let mut stdout = BufReader::new(running.0.stdout.take().unwrap());

    // Everything up to the last command of the tour; commands continued with `\` are joined.
    let mut sections: Vec<(String, Vec<String>)> = Vec::new();
    let mut tour = String::new();
    let mut pending = String::new();
    loop {
        let mut line = String::new();
        let read = stdout.read_line(&mut line).unwrap();
        assert!(read > 0, "keel-demo exited before its tour:\n{tour}");
        tour.push_str(&line);
        let line = line.trim_end();
        if line.ends_with(':') && !line.starts_with(' ') {
            sections.push((line.to_string(), Vec::new()));
            continue;
        }
        let command = line.trim_start();
        if let Some(continued) = command.strip_suffix('\\') {
            pending.push_str(continued);
            continue;
        }
        if !pending.is_empty() || command.starts_with("curl ") || command.starts_with("dig ") {
            let whole = format!("{pending}{command}");
            pending.clear();
            if let Some((_, commands)) = sections.last_mut() {
                commands.push(whole);
            }
        }
        if line.contains(":9090/") {
            break;
        }
    }
    let commands = |heading: &str| -> Vec<String> {
        sections
            .iter()
            .find(|(title, _)| title.starts_with(heading))
            .map(|(_, commands)| commands.clone())
            .unwrap_or_else(|| panic!("no {heading:?} section in:\n{tour}"))
    };
    assert!(tour.contains("Checked: web.demo.svc.cluster.local resolved to"), "{tour}");
    assert!(!tour.contains(":15"), "every port follows --base-port:\n{tour}");

    // Try: the name resolves to a VIP in the range asked for, and the request crosses the tunnel.
    let try_commands = commands("Try");
    assert_eq!(try_commands.len(), 3, "{tour}");
    let vip = shell(&try_commands[0]).trim().to_string();
    let range: ipnet::Ipv4Net = vip_range.parse().unwrap();
    assert!(range.contains(&vip.parse::<std::net::Ipv4Addr>().unwrap()), "dig answered {vip:?}");
    for command in &try_commands[1..] {
        let body = shell(command);
        assert!(
            body.starts_with("hello from web on demo-publisher, through the tunnel"),
            "{command}: {body}"
        );
    }

    // Look at: every page answers, with what it says it shows.
    // (Statuses reach the control plane within a second or two, hence `eventually`.)
    let look = commands("Look at");
    let shows = [
        "\"ackedVersion\":\"",
        "\"id\":\"demo-publisher-web\"",
        "\"kind\":\"VisitedService\"",
        "control-plane:http://",
        "\"type\":\"visitor\"",
        "keel_dns_queries_total",
    ];
    assert_eq!(look.len(), shows.len(), "{look:?}");
    for (command, expected) in look.iter().zip(shows) {
        eventually(command, expected);
    }

    // Change it: the visitor moves to port 9090.
    let change = commands("Change it");
    assert_eq!(change.len(), 2, "{change:?}");
    shell(&change[0]);
    eventually(&change[1], "hello from web on demo-publisher");

    interrupt(&running.0);
    let status = wait_exit(&mut running.0, Duration::from_secs(15));
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    assert!(status.success(), "{status:?}");
    assert!(rest.contains("stopped"), "{rest}");
}

#[test]
fn a_taken_port_or_a_public_address_is_refused_with_what_to_change() {
    let (host, vip_range) = private_loopback();
    // Something already listens where the control plane would.
    let taken = std::net::TcpListener::bind(format!("{host}:20080")).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_keel-demo"))
        .args(["--host", &host, "--base-port", "20000", "--vip-range", &vip_range, "--dns-upstream", "none"])
        .output()
        .unwrap();
    drop(taken);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&format!("cannot start the control plane on {host}:20080")), "{stderr}");

    let output =
        Command::new(env!("CARGO_BIN_EXE_keel-demo")).args(["--host", "192.0.2.1"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("--host 192.0.2.1 is not a loopback address"), "{stderr}");
}
