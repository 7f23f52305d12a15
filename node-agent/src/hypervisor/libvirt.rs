//! [`Hypervisor`] over libvirt, through the `virt` crate.
//!
//! libvirt's API is blocking FFI, so every call runs on tokio's blocking pool
//! (`spawn_blocking`), never on the async runtime's workers; a `LibvirtHypervisor` must therefore
//! be used inside a tokio runtime.
//!
//! One connection serves every call. libvirt connections are thread-safe (the `virt` crate marks
//! `Connect` `Send + Sync` for that reason), so calls share it through an `Arc` and run in
//! parallel: a slow `destroy` of one domain does not hold up the others, as a `Mutex<Connect>`
//! held for each call would. Opening a connection per call would cost a handshake with libvirtd
//! each time and, worse, would break the test driver: `test:///default` keeps its domains in one
//! in-process state shared by every connection to it, which lives only while at least one of
//! them is open; once the last closes, the next connection starts again from the driver's single
//! built-in `test` domain. Keeping one connection for the hypervisor's life keeps that state.
//!
//! A `LibvirtHypervisor` serves one node: it lists and touches only the domains whose metadata
//! names that node, so two agents sharing a libvirtd (tests running in parallel, or a second
//! agent started by mistake) never take each other's domains for orphans.
//!
//! Defines are not validated against libvirt's RelaxNG schema at run time (each validation
//! reparses the whole schema); the domain XML comes only from `domain::render`, and the golden
//! tests validate every rendered case against the installed schema with `virt-xml-validate`.
//!
//! No call waits forever on a libvirtd that stopped answering. The process runs libvirt's default
//! event loop on a thread of its own ([`start_event_loop`]), and every connection asks libvirtd
//! whether it is alive every [`KeepAlive::interval`]: after [`KeepAlive::count`] unanswered asks
//! libvirt closes the connection, and every call waiting on it fails. The event loop also sees a
//! libvirtd restart at once (the socket closes), so that the next call reconnects instead of
//! failing on the dead socket. The test driver's connection is local and always alive.
//!
//! At most [`DEFAULT_MAX_CALLS`] calls (or [`LibvirtHypervisor::with_max_calls`]) run on the
//! connection at once; the others wait here. libvirtd works on at most `max_client_requests`
//! calls of one client (5 by default) and reads nothing more from its socket meanwhile, the
//! keepalive answers included: with all of them in flight on a libvirtd that is slow (probing
//! QEMU, starting many domains), the keepalive would close a live connection and fail every
//! call on it. One request slot stays free for the keepalive. libvirt's test driver
//! (`test:///…`) runs in the agent's own process, with no daemon and no such limit: its calls are
//! not held back.
//!
//! A short mutex guards only the swap of the connection: before each call the connection is
//! checked with `virConnectIsAlive` (a local check, no round trip) and, if it is closed, one
//! call opens it again outside the lock. Opening waits for libvirtd's answer, for as long as
//! libvirtd takes; meanwhile other calls fail at once ([`HypervisorError::Reconnecting`]) rather
//! than pile up behind it.
//!
//! A domain start is the exception: it runs on a connection of its own, opened for it (still
//! under a call permit), because a call that long stalls the calls sent after it on a shared
//! connection (see `LibvirtHypervisor::blocking_alone`).

use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use tokio::sync::Semaphore;

use virt::connect::Connect;
use virt::domain::{Domain, DomainState as LibvirtState};
use virt::enumutil::Enum;
use virt::error::ErrorNumber;

use super::{Hypervisor, HypervisorError, ObservedDomain};
use crate::domain::{self, Owner};
use crate::plan::DomainState;

/// [`Hypervisor`] backed by libvirt (`qemu:///system`, `test:///default`, ...), for one node.
#[derive(Clone)]
pub struct LibvirtHypervisor {
    shared: Arc<Shared>,
    /// Permits for calls in flight on the connection.
    calls: Arc<Semaphore>,
}

/// Calls at once on one connection by default: one less than libvirtd's default
/// `max_client_requests` (5), so that the keepalive is always read.
pub const DEFAULT_MAX_CALLS: usize = 4;

struct Shared {
    uri: String,
    node: String,
    keepalive: KeepAlive,
    conn: Mutex<Slot>,
}

/// The connection, or why there is none.
enum Slot {
    /// Open (it may have closed since: check `is_alive`).
    Open(Arc<Connect>),
    /// A call is opening it again.
    Opening,
    /// The last attempt to open it failed.
    Closed,
}

/// How a connection makes sure libvirtd still answers (libvirt's `virConnectSetKeepAlive`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeepAlive {
    /// How long the connection may be quiet before it asks libvirtd whether it is alive.
    pub interval: Duration,
    /// How many asks may go unanswered before libvirt closes the connection; the calls waiting
    /// on it then fail. A libvirtd that stopped answering is given up on after about
    /// `interval * (count + 1)`.
    pub count: u32,
}

impl Default for KeepAlive {
    /// Every 5 s, closed after 5 unanswered asks (about 30 s), as libvirtd does toward its clients.
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(5),
            count: 5,
        }
    }
}

impl std::fmt::Debug for LibvirtHypervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LibvirtHypervisor")
            .field("uri", &self.shared.uri)
            .field("node", &self.shared.node)
            .finish_non_exhaustive()
    }
}

impl LibvirtHypervisor {
    /// Opens a connection to libvirt at `uri`, e.g. `qemu:///system` or `test:///default`, for
    /// the agent of `node`: only domains whose metadata names `node` are its own.
    ///
    /// Also silences libvirt's default error handler, which would print every error (including
    /// the expected "no such domain") to stderr; errors are returned instead.
    pub async fn connect(uri: &str, node: &str) -> Result<Self, HypervisorError> {
        Self::connect_with(uri, node, KeepAlive::default()).await
    }

    /// [`LibvirtHypervisor::connect`] with the given keepalive instead of the default one.
    pub async fn connect_with(
        uri: &str,
        node: &str,
        keepalive: KeepAlive,
    ) -> Result<Self, HypervisorError> {
        let uri = uri.to_owned();
        let node = node.to_owned();
        tokio::task::spawn_blocking(move || {
            virt::error::clear_error_callback();
            start_event_loop()?;
            let conn = open(&uri, keepalive)?;
            let calls = Arc::new(Semaphore::new(default_max_calls(&uri)));
            Ok(Self {
                shared: Arc::new(Shared {
                    uri,
                    node,
                    keepalive,
                    conn: Mutex::new(Slot::Open(Arc::new(conn))),
                }),
                calls,
            })
        })
        .await
        .map_err(HypervisorError::Blocking)?
    }

    /// Runs at most `max_calls` calls at once (at least one) instead of [`DEFAULT_MAX_CALLS`]:
    /// for a libvirtd whose `max_client_requests` is above `max_calls`.
    pub fn with_max_calls(mut self, max_calls: usize) -> Self {
        self.calls = Arc::new(Semaphore::new(max_calls.max(1)));
        self
    }

    /// The connection URI.
    pub fn uri(&self) -> &str {
        &self.shared.uri
    }

    /// The node whose domains this hypervisor manages.
    pub fn node(&self) -> &str {
        &self.shared.node
    }

    /// Runs `f` with the connection and the node name on the blocking pool.
    async fn blocking<T, F>(&self, f: F) -> Result<T, HypervisorError>
    where
        T: Send + 'static,
        F: FnOnce(&Connect, &str) -> Result<T, HypervisorError> + Send + 'static,
    {
        self.run(false, f).await
    }

    /// [`LibvirtHypervisor::blocking`] on a connection of the call's own, opened for it and
    /// closed after, for a call that keeps libvirtd busy for a second or more (a domain start:
    /// QEMU's set-up). On a shared connection such a call stalled the calls sent after it:
    /// libvirt's client (9.0) sent nothing more on the connection until the long call's answer
    /// came: in `bench-guests`, libvirtd received no call from the agent for up to 2.8 s while
    /// ten domains started. libvirt's in-process test driver has no socket to stall and keeps
    /// the shared connection.
    async fn blocking_alone<T, F>(&self, f: F) -> Result<T, HypervisorError>
    where
        T: Send + 'static,
        F: FnOnce(&Connect, &str) -> Result<T, HypervisorError> + Send + 'static,
    {
        self.run(!is_test_driver(&self.shared.uri), f).await
    }

    /// Runs `f` on the blocking pool once a call permit is free, on the shared connection or
    /// (`alone`) on one opened for it.
    async fn run<T, F>(&self, alone: bool, f: F) -> Result<T, HypervisorError>
    where
        T: Send + 'static,
        F: FnOnce(&Connect, &str) -> Result<T, HypervisorError> + Send + 'static,
    {
        let permit = Arc::clone(&self.calls)
            .acquire_owned()
            .await
            .expect("the call semaphore is never closed");
        let shared = Arc::clone(&self.shared);
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let conn = if alone {
                Arc::new(open(&shared.uri, shared.keepalive)?)
            } else {
                shared.connection()?
            };
            f(&conn, &shared.node)
        })
        .await
        .map_err(HypervisorError::Blocking)?
    }
}

impl Shared {
    /// The live connection, opened again first if it closed (libvirtd restarted, or stopped
    /// answering its keepalive); [`HypervisorError::Reconnecting`] while another call does that.
    fn connection(&self) -> Result<Arc<Connect>, HypervisorError> {
        {
            let mut slot = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
            match &*slot {
                Slot::Open(conn) if conn.is_alive().unwrap_or(false) => {
                    return Ok(Arc::clone(conn));
                }
                Slot::Opening => {
                    return Err(HypervisorError::Reconnecting {
                        uri: self.uri.clone(),
                    })
                }
                Slot::Open(_) | Slot::Closed => *slot = Slot::Opening,
            }
        }
        let opened = open(&self.uri, self.keepalive).map(Arc::new);
        let mut slot = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        *slot = match &opened {
            Ok(conn) => Slot::Open(Arc::clone(conn)),
            Err(_) => Slot::Closed,
        };
        opened
    }
}

/// Whether `uri` names libvirt's test driver, which runs in this process (no daemon, no
/// socket). Pure.
fn is_test_driver(uri: &str) -> bool {
    uri.starts_with("test:")
}

/// How many calls run at once on a connection to `uri` unless told otherwise:
/// [`DEFAULT_MAX_CALLS`] for a libvirtd, no limit for the in-process test driver. Pure.
pub fn default_max_calls(uri: &str) -> usize {
    if is_test_driver(uri) {
        Semaphore::MAX_PERMITS
    } else {
        DEFAULT_MAX_CALLS
    }
}

/// Registers libvirt's default event loop and runs it on a thread of its own, once per process.
/// Connections opened after it keep themselves alive and notice a closed socket by themselves.
fn start_event_loop() -> Result<(), HypervisorError> {
    static STARTED: OnceLock<Result<(), String>> = OnceLock::new();
    STARTED
        .get_or_init(|| {
            virt::event::event_register_default_impl().map_err(|e| e.message().to_owned())?;
            std::thread::Builder::new()
                .name("libvirt-events".to_owned())
                .spawn(|| loop {
                    if let Err(error) = virt::event::event_run_default_impl() {
                        tracing::warn!(error = error.message(), "libvirt's event loop failed");
                        // Not a spin: an iteration that fails at once is retried a little later.
                        std::thread::sleep(Duration::from_millis(100));
                    }
                })
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
        .clone()
        .map_err(HypervisorError::EventLoop)
}

fn open(uri: &str, keepalive: KeepAlive) -> Result<Connect, HypervisorError> {
    let conn = Connect::open(Some(uri)).map_err(|libvirt| HypervisorError::Connect {
        uri: uri.to_owned(),
        libvirt,
    })?;
    let interval = i32::try_from(keepalive.interval.as_secs().max(1)).unwrap_or(i32::MAX);
    if let Err(error) = conn.set_keep_alive(interval, keepalive.count) {
        // Local drivers (the test driver) have no connection to keep alive.
        tracing::debug!(
            uri,
            error = error.message(),
            "libvirt connection without keepalive"
        );
    }
    Ok(conn)
}

fn is_no_domain(e: &virt::error::Error) -> bool {
    matches!(e.code(), Enum::Known(ErrorNumber::NoDomain))
}

fn failed(op: &'static str, name: &str) -> impl FnOnce(virt::error::Error) -> HypervisorError {
    let name = name.to_owned();
    move |libvirt| HypervisorError::Libvirt { op, name, libvirt }
}

/// The domain of that name, if any.
fn lookup(conn: &Connect, name: &str) -> Result<Option<Domain>, HypervisorError> {
    match conn.lookup_domain_by_name(name) {
        Ok(dom) => Ok(Some(dom)),
        Err(e) if is_no_domain(&e) => Ok(None),
        Err(e) => Err(failed("look up", name)(e)),
    }
}

/// The owner recorded in a domain's live XML; `Ok(None)` when it has none, `Err` with
/// `NoDomain` when the domain vanished meanwhile.
fn owner_of(dom: &Domain) -> Result<Option<Owner>, virt::error::Error> {
    Ok(domain::ownership(&dom.xml_desc(0)?))
}

/// Any domain of that name with the owner its metadata names: `None` when there is none,
/// `Some((domain, None))` when it is not Karri's.
fn owned(conn: &Connect, name: &str) -> Result<Option<(Domain, Option<Owner>)>, HypervisorError> {
    let Some(dom) = lookup(conn, name)? else {
        return Ok(None);
    };
    match owner_of(&dom) {
        Ok(owner) => Ok(Some((dom, owner))),
        Err(e) if is_no_domain(&e) => Ok(None),
        Err(e) => Err(failed("read", name)(e)),
    }
}

/// The domain of that name if it is `node`'s: `None` when there is none, `NotOurs` when it is
/// not Karri's or belongs to another node.
fn ours(
    conn: &Connect,
    node: &str,
    name: &str,
) -> Result<Option<(Domain, Owner)>, HypervisorError> {
    match owned(conn, name)? {
        None => Ok(None),
        Some((dom, Some(owner))) if owner.node == node => Ok(Some((dom, owner))),
        Some(_) => Err(HypervisorError::NotOurs {
            name: name.to_owned(),
        }),
    }
}

/// The domain's state, and whether it is shut off by a shutdown of its guest OS (libvirt's
/// shut-off reason `shutdown`). A failed call is an error, not an unknown state: a stop must
/// not destroy a domain because libvirt did not answer once.
fn state_of(dom: &Domain) -> Result<(DomainState, bool), virt::error::Error> {
    use virt::domain::{DomainShutoffReason, DomainStateReason};
    let (state, reason) = dom.state()?;
    // `virt` drops virDomainGetState's failure and reads its -1 as an unknown state.
    if matches!(state, Enum::Unknown(raw) if raw == virt::sys::virDomainState::MAX) {
        return Err(virt::error::Error::last_error());
    }
    let shut_down = matches!(
        (&state, &reason),
        (
            Enum::Known(LibvirtState::Shutoff),
            Enum::Known(DomainStateReason::Shutoff(Enum::Known(
                DomainShutoffReason::Shutdown
            )))
        )
    );
    let state = match state {
        Enum::Known(LibvirtState::Running | LibvirtState::Blocked) => DomainState::Running,
        Enum::Known(LibvirtState::Paused) => DomainState::Paused,
        Enum::Known(LibvirtState::Shutdown) => DomainState::ShuttingDown,
        Enum::Known(LibvirtState::Shutoff) => DomainState::ShutOff,
        Enum::Known(LibvirtState::Crashed) => DomainState::Crashed,
        Enum::Known(LibvirtState::NoState | LibvirtState::PMSuspended) | Enum::Unknown(_) => {
            DomainState::Other
        }
    };
    Ok((state, shut_down))
}

fn observe(dom: &Domain, name: String, owner: Owner) -> Result<ObservedDomain, virt::error::Error> {
    let defined = dom.is_persistent()?;
    let (state, shut_down) = state_of(dom)?;
    Ok(ObservedDomain {
        name,
        uid: owner.uid,
        instance_id: owner.instance_id,
        namespace: owner.namespace,
        state,
        id: dom.id(),
        defined,
        shut_down,
    })
}

fn list_ours(conn: &Connect, node: &str) -> Result<Vec<ObservedDomain>, HypervisorError> {
    let domains = conn
        .list_all_domains(0)
        .map_err(|libvirt| HypervisorError::List { libvirt })?;
    let mut ours = Vec::new();
    for dom in domains {
        let name = dom
            .name()
            .map_err(|libvirt| HypervisorError::List { libvirt })?;
        let seen = owner_of(&dom).and_then(|owner| match owner {
            Some(owner) if owner.node == node => observe(&dom, name.clone(), owner).map(Some),
            // Not Karri's, or another node's.
            _ => Ok(None),
        });
        match seen {
            Ok(Some(observed)) => ours.push(observed),
            Ok(None) => {}
            // Gone between the listing and the look: not there any more.
            Err(e) if is_no_domain(&e) => {}
            Err(e) => return Err(failed("read", &name)(e)),
        }
    }
    ours.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(ours)
}

fn define(conn: &Connect, node: &str, xml: &str) -> Result<(), HypervisorError> {
    let owner = domain::ownership(xml).ok_or(HypervisorError::Unowned)?;
    if owner.node != node {
        return Err(HypervisorError::OtherNode {
            xml_node: owner.node,
            node: node.to_owned(),
        });
    }
    let name = domain::name_of(xml).ok_or(HypervisorError::Unnamed)?;
    match owned(conn, &name)? {
        None => {}
        Some((_, None)) => return Err(HypervisorError::NotOurs { name }),
        Some((_, Some(existing))) if existing.node != owner.node || existing.uid != owner.uid => {
            return Err(HypervisorError::Conflict {
                name,
                existing_uid: existing.uid,
                existing_node: existing.node,
                uid: owner.uid,
                node: owner.node,
            });
        }
        // Our own domain: redefining it is fine.
        Some(_) => {}
    }
    // Not `VIR_DOMAIN_DEFINE_VALIDATE`: that reparses libvirt's whole RelaxNG schema on every
    // define (in libvirtd, or in this process for the test driver), which cost two thirds of the
    // agent's CPU in a launch burst. The XML comes only from `domain::render`, whose every case
    // the golden tests validate against the installed schema (`virt-xml-validate`).
    conn.define_domain_xml_flags(xml, 0)
        .map_err(failed("define", &name))?;
    Ok(())
}

/// Runs `op` on an active (`want_active == false`) or inactive domain, treating "already there"
/// as success: if the call fails but the domain reached the goal anyway, the failure is dropped.
fn power(
    conn: &Connect,
    node: &str,
    name: &str,
    op: &'static str,
    want_active: bool,
    call: fn(&Domain) -> Result<(), virt::error::Error>,
) -> Result<(), HypervisorError> {
    let Some((dom, _)) = ours(conn, node, name)? else {
        return if want_active {
            Err(HypervisorError::NotFound {
                name: name.to_owned(),
            })
        } else {
            Ok(())
        };
    };
    // A domain that vanished meanwhile is off, which is what shutdown and destroy want.
    let reached = |dom: &Domain| match dom.is_active() {
        Ok(active) => Ok(active == want_active),
        Err(e) if !want_active && is_no_domain(&e) => Ok(true),
        Err(e) => Err(e),
    };
    if reached(&dom).map_err(failed(op, name))? {
        return Ok(());
    }
    match call(&dom) {
        Ok(()) => Ok(()),
        // The test driver answers "not running" as an internal error, so look rather than
        // trust the error code.
        Err(_) if reached(&dom).unwrap_or(false) => Ok(()),
        Err(e) => Err(failed(op, name)(e)),
    }
}

/// Reset our running domain; drivers without reset (libvirt's test driver) reboot it instead.
fn reset(conn: &Connect, node: &str, name: &str) -> Result<(), HypervisorError> {
    let Some((dom, _)) = ours(conn, node, name)? else {
        return Err(HypervisorError::NotFound {
            name: name.to_owned(),
        });
    };
    match dom.reset() {
        Ok(_) => Ok(()),
        Err(_) => dom.reboot(0).map(|_| ()).map_err(failed("reboot", name)),
    }
}

fn undefine(conn: &Connect, node: &str, name: &str) -> Result<(), HypervisorError> {
    let Some((dom, _)) = ours(conn, node, name)? else {
        return Ok(());
    };
    if !dom.is_persistent().map_err(failed("undefine", name))? {
        return Ok(());
    }
    let flags = virt::sys::VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
        | virt::sys::VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA;
    match dom.undefine_flags(flags) {
        Err(e) if !is_no_domain(&e) => Err(failed("undefine", name)(e)),
        _ => Ok(()),
    }
}

impl Hypervisor for LibvirtHypervisor {
    async fn list_ours(&self) -> Result<Vec<ObservedDomain>, HypervisorError> {
        self.blocking(list_ours).await
    }

    async fn observe(&self, name: &str) -> Result<Option<ObservedDomain>, HypervisorError> {
        let name = name.to_owned();
        self.blocking(move |conn, node| {
            let Some((dom, owner)) = ours(conn, node, &name)? else {
                return Ok(None);
            };
            match observe(&dom, name.clone(), owner) {
                Ok(observed) => Ok(Some(observed)),
                Err(e) if is_no_domain(&e) => Ok(None),
                Err(e) => Err(failed("read", &name)(e)),
            }
        })
        .await
    }

    async fn define(&self, xml: &str) -> Result<(), HypervisorError> {
        let xml = xml.to_owned();
        self.blocking(move |conn, node| define(conn, node, &xml))
            .await
    }

    async fn start(&self, name: &str) -> Result<(), HypervisorError> {
        let name = name.to_owned();
        self.blocking_alone(move |conn, node| {
            power(conn, node, &name, "start", true, Domain::create)
        })
        .await
    }

    async fn shutdown(&self, name: &str) -> Result<(), HypervisorError> {
        let name = name.to_owned();
        // Flags 0 let the driver choose; QEMU without a guest agent presses the ACPI power
        // button, and the test driver accepts no other flags.
        self.blocking(move |conn, node| {
            power(conn, node, &name, "shut down", false, Domain::shutdown)
        })
        .await
    }

    async fn reboot(&self, name: &str) -> Result<(), HypervisorError> {
        let name = name.to_owned();
        self.blocking(move |conn, node| reset(conn, node, &name))
            .await
    }

    async fn destroy(&self, name: &str) -> Result<(), HypervisorError> {
        let name = name.to_owned();
        self.blocking(move |conn, node| power(conn, node, &name, "destroy", false, Domain::destroy))
            .await
    }

    async fn undefine(&self, name: &str) -> Result<(), HypervisorError> {
        let name = name.to_owned();
        self.blocking(move |conn, node| undefine(conn, node, &name))
            .await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[test]
    fn only_a_libvirtd_connection_holds_calls_back_by_default() {
        assert_eq!(default_max_calls("qemu:///system"), DEFAULT_MAX_CALLS);
        assert_eq!(
            default_max_calls("qemu+unix:///system?socket=/run/x/libvirt-sock"),
            DEFAULT_MAX_CALLS
        );
        assert_eq!(default_max_calls("test:///default"), Semaphore::MAX_PERMITS);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_more_calls_than_allowed_run_on_the_connection_at_once() {
        let hv = LibvirtHypervisor::connect("test:///default", "node-max-calls")
            .await
            .expect("the test driver connects")
            .with_max_calls(3);
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let calls = (0..12).map(|_| {
            let (hv, running, most) = (hv.clone(), running.clone(), most.clone());
            tokio::spawn(async move {
                hv.blocking(move |_, _| {
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    // Long enough for every waiting call to pile up if nothing held it back.
                    std::thread::sleep(Duration::from_millis(50));
                    running.fetch_sub(1, Ordering::SeqCst);
                    Ok(())
                })
                .await
            })
        });
        for call in futures::future::join_all(calls).await {
            call.expect("the call task ends")
                .expect("the call succeeds");
        }
        assert_eq!(most.load(Ordering::SeqCst), 3);
    }
}
