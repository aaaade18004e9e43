//! Network namespaces for blackhole experiments (Linux, root): a namespace with one veth link to
//! the host, whose inner side can be taken down (packets vanish: no RST, no FIN, like a node that
//! died) and brought back. Used by `meshlb up --chaos`, `meshlb bench --scenarios blackhole` and the
//! tests; removed when dropped. Knows nothing of replicas or balancing: it runs `ip`.

use std::process::Command;

/// Why a namespace could not be made or changed.
#[derive(Debug, thiserror::Error)]
#[error("ip {args}: {message}")]
pub struct NetnsError {
    args: String,
    message: String,
}

/// A namespace with one veth link to the host; deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
    inner_link: String,
    host_link: String,
    inner_ip: std::net::Ipv4Addr,
}

fn ip(args: &[&str]) -> Result<(), NetnsError> {
    let fail = |message: String| NetnsError {
        args: args.join(" "),
        message,
    };
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| fail(format!("cannot run ip (iproute2): {e}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(fail(String::from_utf8_lossy(&out.stderr).trim().to_owned()))
    }
}

/// Whether this process may make namespaces (root on Linux, with `ip` installed).
pub fn available() -> bool {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: geteuid has no memory effects.
        let root = unsafe { libc::geteuid() } == 0;
        root && Command::new("ip")
            .arg("-V")
            .output()
            .is_ok_and(|o| o.status.success())
    }
    #[cfg(not(target_os = "linux"))]
    {
        false
    }
}

impl Netns {
    /// Makes namespace number `n` of this process (`tag` keeps concurrent users apart), its
    /// link up, with the inner side at `10.a.b.2` and the host side at `10.a.b.1`.
    pub fn new(tag: &str, n: u32) -> Result<Self, NetnsError> {
        // The whole pid: two live processes never share a name (a same-named namespace left
        // behind is from a process that is gone).
        let id = std::process::id() * 10 + n % 10;
        let name = format!("mlb-{tag}-{id}");
        let host_link = format!("mlh{tag}{id}");
        let inner_link = format!("mln{tag}{id}");
        let (a, b) = (100 + (id % 150) as u8, ((id / 150) % 250) as u8);
        let subnet = format!("10.{a}.{b}");
        let ns = Self {
            name,
            inner_link,
            host_link,
            inner_ip: std::net::Ipv4Addr::new(10, a, b, 2),
        };
        // Leftovers of an earlier run that was killed before it could clean up.
        let _ = ip(&["netns", "del", &ns.name]);
        let _ = ip(&["link", "del", &ns.host_link]);
        ip(&["netns", "add", &ns.name])?;
        ip(&[
            "link",
            "add",
            &ns.host_link,
            "type",
            "veth",
            "peer",
            "name",
            &ns.inner_link,
        ])?;
        ip(&["link", "set", &ns.inner_link, "netns", &ns.name])?;
        ip(&[
            "addr",
            "add",
            &format!("{subnet}.1/30"),
            "dev",
            &ns.host_link,
        ])?;
        ip(&["link", "set", &ns.host_link, "up"])?;
        ns.exec(&[
            "ip",
            "addr",
            "add",
            &format!("{subnet}.2/30"),
            "dev",
            &ns.inner_link,
        ])?;
        ns.exec(&["ip", "link", "set", "lo", "up"])?;
        ns.restore()?;
        Ok(ns)
    }

    /// The namespace's name (for `ip netns exec NAME ...`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The address of the namespace's side of the link.
    pub fn inner_ip(&self) -> std::net::IpAddr {
        self.inner_ip.into()
    }

    /// A command that runs `program` inside the namespace.
    pub fn command(&self, program: &std::path::Path) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    fn exec(&self, args: &[&str]) -> Result<(), NetnsError> {
        let mut all = vec!["netns", "exec", &self.name];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// Takes the namespace's side of the link down: a blackhole.
    pub fn cut(&self) -> Result<(), NetnsError> {
        self.exec(&["ip", "link", "set", &self.inner_link, "down"])
    }

    /// Brings the link back.
    pub fn restore(&self) -> Result<(), NetnsError> {
        self.exec(&["ip", "link", "set", &self.inner_link, "up"])
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
        let _ = ip(&["link", "del", &self.host_link]);
    }
}
