//! Named network namespaces (`ip netns add NAME`, a handle at `/run/netns/NAME`): sockets and
//! commands inside one, while the agent process itself stays in the root namespace.
//!
//! A socket belongs to the namespace it was created in, whatever thread uses it later. So
//! [`bind_tcp`] creates its listener on a short-lived helper thread that first moves itself into
//! the namespace with `setns(2)` ([`run_in`]); the listener then serves from any task of the agent.
//! Commands go through `ip netns exec` ([`command`]).

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsFd;
use std::path::PathBuf;

use rustix::thread::{move_into_link_name_space, LinkNameSpaceType};

/// Where `ip netns add` keeps the namespace handles.
pub const NETNS_DIR: &str = "/run/netns";

/// The handle of namespace `name`, `/run/netns/<name>`; an error for a name that is not a plain
/// file name.
pub fn path(name: &str) -> io::Result<PathBuf> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') || name.contains('\0') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is not a network namespace name"),
        ));
    }
    Ok(PathBuf::from(NETNS_DIR).join(name))
}

/// Runs `f` on a helper thread that has moved into network namespace `name`, and returns what
/// `f` returns. The calling thread stays where it is. Fails when the namespace cannot be opened
/// or entered (it does not exist, or the process lacks `CAP_SYS_ADMIN`).
pub fn run_in<T, F>(name: &str, f: F) -> io::Result<T>
where
    T: Send,
    F: FnOnce() -> T + Send,
{
    let path = path(name)?;
    let handle = File::open(&path).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("opening network namespace {}: {e}", path.display()),
        )
    })?;
    std::thread::scope(|scope| {
        let thread = std::thread::Builder::new()
            .name(format!("netns-{name}"))
            .spawn_scoped(scope, || {
                move_into_link_name_space(handle.as_fd(), Some(LinkNameSpaceType::Network))
                    .map_err(|e| {
                        io::Error::new(
                            io::Error::from(e).kind(),
                            format!("entering network namespace {name}: {e}"),
                        )
                    })?;
                Ok(f())
            })?;
        match thread.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// A TCP listener on `addr`, inside network namespace `netns` when given (else in the caller's
/// namespace). The listener is non-blocking, ready for `tokio::net::TcpListener::from_std`, and
/// has `SO_REUSEADDR` set (std sets it on Unix), so a restarted agent binds again at once.
pub fn bind_tcp(netns: Option<&str>, addr: SocketAddr) -> io::Result<TcpListener> {
    let bind = move || -> io::Result<TcpListener> {
        let listener = TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        Ok(listener)
    };
    match netns {
        Some(name) => {
            let listener = run_in(name, bind)??;
            tracing::debug!(netns = name, %addr, "bound a listener inside the namespace");
            Ok(listener)
        }
        None => bind(),
    }
}

/// A command running `program` inside network namespace `netns` (as `ip netns exec <netns>
/// <program>`), or plainly when `netns` is `None`. Add the program's arguments with `arg`/`args`.
pub fn command(netns: Option<&str>, program: impl AsRef<OsStr>) -> tokio::process::Command {
    match netns {
        Some(name) => {
            let mut cmd = tokio::process::Command::new("ip");
            cmd.args(["netns", "exec", name]).arg(program);
            cmd
        }
        None => tokio::process::Command::new(program),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{IpAddr, Ipv4Addr, TcpStream};
    use std::process::Command;

    use karri_testkit::simhost::Netns;

    /// An address from the benchmarking range that only the test namespace has.
    const NS_ONLY: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);

    fn run(cmd: &mut Command) {
        let out = cmd.output().expect("running a command");
        assert!(
            out.status.success(),
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    fn path_rejects_names_that_are_not_plain_file_names() {
        for bad in ["", ".", "..", "a/b", "../x"] {
            assert!(path(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(
            path("karri-t-1").expect("plain name"),
            PathBuf::from("/run/netns/karri-t-1")
        );
    }

    #[test]
    fn command_wraps_the_program_with_ip_netns_exec_only_when_a_namespace_is_given() {
        let inside = command(Some("ns1"), "dnsmasq");
        let std = inside.as_std();
        assert_eq!(std.get_program(), "ip");
        let args: Vec<_> = std.get_args().collect();
        assert_eq!(args, ["netns", "exec", "ns1", "dnsmasq"]);

        let outside = command(None, "dnsmasq");
        assert_eq!(outside.as_std().get_program(), "dnsmasq");
        assert_eq!(outside.as_std().get_args().count(), 0);
    }

    #[test]
    fn run_in_fails_for_a_namespace_that_does_not_exist() {
        let err = run_in("karri-no-such-namespace", || ()).expect_err("no namespace");
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn a_listener_bound_in_a_namespace_serves_there_and_not_in_the_root_namespace() {
        let ns = Netns::new().expect("creating a test namespace");
        run(&mut ns.ip(["addr", "add", &format!("{NS_ONLY}/32"), "dev", "lo"]));

        let listener =
            bind_tcp(Some(ns.name()), SocketAddr::new(IpAddr::V4(NS_ONLY), 0)).expect("binding");
        let addr = listener.local_addr().expect("local address");
        assert_eq!(addr.ip(), IpAddr::V4(NS_ONLY));

        // A client inside the namespace reaches it.
        let client = std::thread::spawn({
            let name = ns.name().to_string();
            move || {
                run_in(&name, move || -> io::Result<String> {
                    let mut stream = TcpStream::connect(addr)?;
                    stream.write_all(b"ping")?;
                    let mut reply = String::new();
                    stream.read_to_string(&mut reply)?;
                    Ok(reply)
                })
            }
        });
        listener.set_nonblocking(false).expect("blocking accept");
        let (mut conn, _) = listener.accept().expect("accepting the client");
        let mut got = [0u8; 4];
        conn.read_exact(&mut got).expect("reading the request");
        assert_eq!(&got, b"ping");
        conn.write_all(b"pong").expect("answering");
        drop(conn);
        let reply = client
            .join()
            .expect("client thread")
            .expect("entering the namespace")
            .expect("talking to the listener");
        assert_eq!(reply, "pong");

        // The root namespace does not have the address: binding it there fails.
        let err = TcpListener::bind(SocketAddr::new(IpAddr::V4(NS_ONLY), 0))
            .expect_err("the address exists only inside the namespace");
        assert_eq!(err.kind(), io::ErrorKind::AddrNotAvailable);
    }

    #[test]
    fn bind_tcp_without_a_namespace_binds_in_the_callers_namespace() {
        let listener = bind_tcp(None, SocketAddr::from(([127, 0, 0, 1], 0))).expect("binding");
        let addr = listener.local_addr().expect("local address");
        TcpStream::connect(addr).expect("connecting on loopback");
    }
}
