//! Target strings, in gRPC's name-resolution syntax, so a grpc-go or grpcio user reads them
//! without a manual:
//!
//! - `dns:///host:port` or a bare `host:port`: resolve `host` with the system's DNS;
//! - `dns://DNS_IP[:DNS_PORT]/host:port`: resolve with that DNS server instead;
//! - `ipv4:1.2.3.4:50051,1.2.3.5:50051` and `ipv6:[::1]:50051`: a fixed list.
//!
//! Parsing only; nothing here resolves or connects.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

/// Where the endpoints of a service come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A fixed list of addresses (`ipv4:` / `ipv6:`, or a DNS target naming an IP literal).
    Static(Vec<SocketAddr>),
    /// A name resolved through DNS, re-resolved as its records expire.
    Dns {
        /// The DNS server to ask; `None` means the system's resolver configuration.
        server: Option<SocketAddr>,
        /// The name to resolve.
        host: String,
        /// The port every resolved address is given.
        port: u16,
    },
}

/// What is wrong with a target string.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    /// The string is empty.
    #[error("empty target: expected dns:///host:port, ipv4:addr:port,... or host:port")]
    Empty,
    /// A scheme meshlb does not resolve.
    #[error("unsupported scheme {0:?} in target: use dns:, ipv4: or ipv6:")]
    Scheme(String),
    /// The port is missing.
    #[error("missing port in {0:?}: expected host:port")]
    MissingPort(String),
    /// The port is not a number from 1 to 65535.
    #[error("bad port {port:?} in {input:?}: expected 1-65535")]
    BadPort {
        /// The whole piece that held it.
        input: String,
        /// The port text.
        port: String,
    },
    /// An `ipv4:`/`ipv6:` entry is not an address of that family.
    #[error("bad {family} address {0:?}", family = .1)]
    BadAddress(String, &'static str),
    /// The host is not a valid DNS name.
    #[error("bad host name {0:?}")]
    BadHost(String),
    /// The DNS authority is not `IP` or `IP:port`.
    #[error("bad DNS server {0:?}: expected IP or IP:port")]
    BadAuthority(String),
}

impl FromStr for Target {
    type Err = TargetError;

    fn from_str(s: &str) -> Result<Self, TargetError> {
        let s = s.trim();
        if s.is_empty() {
            return Err(TargetError::Empty);
        }
        if let Some(list) = s.strip_prefix("ipv4:") {
            return parse_list(list, "IPv4", |a| a.is_ipv4());
        }
        if let Some(list) = s.strip_prefix("ipv6:") {
            return parse_list(list, "IPv6", |a| a.is_ipv6());
        }
        let (server, name) = if let Some(rest) = s.strip_prefix("dns://") {
            let (authority, name) = rest.split_once('/').ok_or(TargetError::Empty)?;
            let server = if authority.is_empty() {
                None
            } else {
                Some(parse_authority(authority)?)
            };
            (server, name)
        } else if let Some(rest) = s.strip_prefix("dns:") {
            (None, rest)
        } else if let Some((scheme, _)) = s.split_once("://") {
            return Err(TargetError::Scheme(scheme.to_owned()));
        } else if let Some(scheme @ ("unix" | "unix-abstract" | "vsock" | "xds")) =
            s.split_once(':').map(|(scheme, _)| scheme)
        {
            return Err(TargetError::Scheme(scheme.to_owned()));
        } else {
            (None, s)
        };
        let (host, port) = split_host_port(name)?;
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(Target::Static(vec![SocketAddr::new(ip, port)]));
        }
        if !valid_host(host) {
            return Err(TargetError::BadHost(host.to_owned()));
        }
        Ok(Target::Dns {
            server,
            host: host.to_owned(),
            port,
        })
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Static(addrs) => {
                let family = if addrs.iter().all(SocketAddr::is_ipv4) {
                    "ipv4"
                } else {
                    "ipv6"
                };
                let list: Vec<_> = addrs.iter().map(ToString::to_string).collect();
                write!(f, "{family}:{}", list.join(","))
            }
            Target::Dns {
                server: None,
                host,
                port,
            } => write!(f, "dns:///{host}:{port}"),
            Target::Dns {
                server: Some(server),
                host,
                port,
            } => write!(f, "dns://{server}/{host}:{port}"),
        }
    }
}

fn parse_list(
    list: &str,
    family: &'static str,
    right_family: fn(&SocketAddr) -> bool,
) -> Result<Target, TargetError> {
    let mut addrs = Vec::new();
    for entry in list.split(',').map(str::trim) {
        if entry.is_empty() {
            return Err(TargetError::BadAddress(entry.to_owned(), family));
        }
        let (host, port) = split_host_port(entry)?;
        let ip: IpAddr = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
            .map_err(|_| TargetError::BadAddress(entry.to_owned(), family))?;
        let addr = SocketAddr::new(ip, port);
        if !right_family(&addr) {
            return Err(TargetError::BadAddress(entry.to_owned(), family));
        }
        if !addrs.contains(&addr) {
            addrs.push(addr);
        }
    }
    Ok(Target::Static(addrs))
}

fn split_host_port(s: &str) -> Result<(&str, u16), TargetError> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| TargetError::BadHost(s.to_owned()))?;
        let port = after
            .strip_prefix(':')
            .ok_or_else(|| TargetError::MissingPort(s.to_owned()))?;
        (host, port)
    } else {
        s.rsplit_once(':')
            .ok_or_else(|| TargetError::MissingPort(s.to_owned()))?
    };
    if host.is_empty() {
        return Err(TargetError::BadHost(s.to_owned()));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok((host, p)),
        _ => Err(TargetError::BadPort {
            input: s.to_owned(),
            port: port.to_owned(),
        }),
    }
}

fn parse_authority(authority: &str) -> Result<SocketAddr, TargetError> {
    let bad = || TargetError::BadAuthority(authority.to_owned());
    if let Ok(ip) = authority.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, 53));
    }
    authority.parse::<SocketAddr>().map_err(|_| bad())
}

fn valid_host(host: &str) -> bool {
    let host = host.strip_suffix('.').unwrap_or(host);
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dns(server: Option<&str>, host: &str, port: u16) -> Target {
        Target::Dns {
            server: server.map(|s| s.parse().unwrap()),
            host: host.into(),
            port,
        }
    }

    #[test]
    fn parses_the_grpc_forms() {
        let cases = [
            (
                "dns:///users.mesh.svc.cluster.local:50051",
                dns(None, "users.mesh.svc.cluster.local", 50051),
            ),
            (
                "dns://127.0.0.1:5353/users.local:50051",
                dns(Some("127.0.0.1:5353"), "users.local", 50051),
            ),
            (
                "dns://10.0.0.1/users:80",
                dns(Some("10.0.0.1:53"), "users", 80),
            ),
            ("dns:users:80", dns(None, "users", 80)),
            ("localhost:50051", dns(None, "localhost", 50051)),
            (
                "ipv4:127.0.0.1:50051,127.0.0.2:50051",
                Target::Static(vec![
                    "127.0.0.1:50051".parse().unwrap(),
                    "127.0.0.2:50051".parse().unwrap(),
                ]),
            ),
            (
                "ipv6:[::1]:50051",
                Target::Static(vec!["[::1]:50051".parse().unwrap()]),
            ),
            (
                "127.0.0.1:7",
                Target::Static(vec!["127.0.0.1:7".parse().unwrap()]),
            ),
        ];
        for (input, want) in cases {
            assert_eq!(input.parse::<Target>(), Ok(want), "{input}");
        }
    }

    #[test]
    fn display_round_trips() {
        for s in [
            "dns:///users.local:50051",
            "dns://127.0.0.1:5353/users.local:50051",
            "ipv4:127.0.0.1:1,127.0.0.2:2",
        ] {
            assert_eq!(s.parse::<Target>().unwrap().to_string(), s);
        }
    }

    #[test]
    fn malformed_targets_say_what_is_wrong() {
        type Check = fn(&TargetError) -> bool;
        let cases: [(&str, Check); 9] = [
            ("", |e| matches!(e, TargetError::Empty)),
            ("users.local", |e| matches!(e, TargetError::MissingPort(_))),
            ("users.local:http", |e| {
                matches!(e, TargetError::BadPort { .. })
            }),
            ("users.local:0", |e| {
                matches!(e, TargetError::BadPort { .. })
            }),
            ("ipv4:300.1.1.1:80", |e| {
                matches!(e, TargetError::BadAddress(..))
            }),
            ("ipv4:[::1]:80", |e| {
                matches!(e, TargetError::BadAddress(..))
            }),
            ("http://x:1", |e| matches!(e, TargetError::Scheme(_))),
            ("dns://nope/x:1", |e| {
                matches!(e, TargetError::BadAuthority(_))
            }),
            ("bad host!:1", |e| matches!(e, TargetError::BadHost(_))),
        ];
        for (input, is_expected) in cases {
            let err = input.parse::<Target>().unwrap_err();
            assert!(is_expected(&err), "{input:?} gave {err:?}");
            assert!(!err.to_string().is_empty());
        }
    }
}
