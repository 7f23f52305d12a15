//! `node-agent`: arrives with the next issue (controllers for the operator, libvirt convergence for
//! the node agent). Until then it refuses to run rather than pretend.

fn main() -> std::process::ExitCode {
    eprintln!("node-agent: not implemented yet; this release ships the api-gateway only");
    std::process::ExitCode::from(2)
}
