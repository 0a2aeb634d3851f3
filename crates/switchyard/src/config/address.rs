//! Worker addresses: one spelling per worker, and which addresses a worker may have.
//!
//! A worker URL reaches the router from the command line, config files, the admin API and
//! (later) discovery. The same host can be written many ways — `127.0.0.1`, `127.1`,
//! `2130706433`, `0x7f.1`, `[::ffff:127.0.0.1]`, `LOCALHOST` — and each spelling used to become
//! a separate worker. Hosts are canonicalised here (IPv4 in dotted quads as inet_aton reads
//! them, IPv6 compressed, names lower-case, `localhost` as `127.0.0.1`), so one worker is one
//! entry. Addresses that are never an inference server are refused: unspecified ones (`0.0.0.0`
//! reaches the router's own host), broadcast and multicast, and — unless an allow-list says
//! otherwise — link-local ones, where cloud metadata services live (the classic SSRF target).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// An IP network, `addr/prefix`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| format!("'{s}' is not a CIDR (like 10.0.0.0/8)"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => {
                p.parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(|| format!("'{s}': prefix must be 0-{max}"))?
            }
            None => max,
        };
        Ok(Self { addr, prefix })
    }
}

impl Cidr {
    /// Whether `ip` is inside the network (IPv4-mapped IPv6 addresses count as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, unmap(ip)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

fn unmap(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// An IPv4 address in any form `inet_aton` accepts: one to four parts, each decimal, octal
/// (leading 0) or hex (0x), the last filling the remaining bytes (`127.1`, `2130706433`).
fn legacy_ipv4(host: &str) -> Option<Ipv4Addr> {
    let parts: Vec<&str> = host.split('.').collect();
    if parts.is_empty() || parts.len() > 4 {
        return None;
    }
    let nums: Vec<u64> = parts
        .iter()
        .map(|p| {
            let p = p.to_ascii_lowercase();
            if let Some(hex) = p.strip_prefix("0x") {
                u64::from_str_radix(hex, 16).ok().filter(|_| !hex.is_empty())
            } else if p.len() > 1 && p.starts_with('0') {
                u64::from_str_radix(&p[1..], 8).ok()
            } else if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) {
                p.parse().ok()
            } else {
                None
            }
        })
        .collect::<Option<_>>()?;
    let (head, last) = nums.split_at(nums.len() - 1);
    if head.iter().any(|n| *n > 255) || last[0] >= 1u64 << (8 * (4 - head.len())) {
        return None;
    }
    let value = head.iter().enumerate().fold(last[0], |acc, (i, n)| acc | (n << (8 * (3 - i))));
    Some(Ipv4Addr::from(u32::try_from(value).ok()?))
}

/// The host as the router writes it, and its IP when it is a literal.
pub fn canonical_host(host: &str) -> Result<(String, Option<IpAddr>), String> {
    let lower = host.trim_end_matches('.').to_ascii_lowercase();
    if lower == "localhost" {
        return Ok(("127.0.0.1".into(), Some(IpAddr::V4(Ipv4Addr::LOCALHOST))));
    }
    let ip = if let Some(inner) = lower.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(unmap(IpAddr::V6(Ipv6Addr::from_str(inner).map_err(|_| format!("'{host}' is not an IPv6 address"))?)))
    } else {
        legacy_ipv4(&lower).map(IpAddr::V4)
    };
    let Some(ip) = ip else {
        if lower.is_empty() || !lower.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
        {
            return Err(format!("'{host}' is not a host name"));
        }
        // An all-numeric last label is an address that does not parse, never a name (RFC 1123).
        if lower.rsplit('.').next().is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit())) {
            return Err(format!("'{host}' is neither an IP address nor a host name"));
        }
        return Ok((lower, None));
    };
    if ip.is_unspecified() {
        return Err(format!("'{host}' is the unspecified address, not a worker"));
    }
    if ip.is_multicast() || ip == IpAddr::V4(Ipv4Addr::BROADCAST) {
        return Err(format!("'{host}' is a multicast or broadcast address, not a worker"));
    }
    let text = match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    };
    Ok((text, Some(ip)))
}

/// Cloud metadata services outside the link-local ranges (Alibaba, AWS over IPv6).
const METADATA: [IpAddr; 2] =
    [IpAddr::V4(Ipv4Addr::new(100, 100, 100, 200)), IpAddr::V6(Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254))];

/// Whether a worker may live at `ip`: inside the allow-list when one is given, else anywhere
/// but link-local ranges and cloud metadata addresses.
pub fn worker_ip_allowed(ip: IpAddr, allow: &[Cidr]) -> Result<(), String> {
    let ip = unmap(ip);
    if !allow.is_empty() {
        return if allow.iter().any(|c| c.contains(ip)) {
            Ok(())
        } else {
            Err(format!("{ip} is outside --worker-allow-cidr"))
        };
    }
    let link_local = match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
    };
    if link_local || METADATA.contains(&ip) {
        return Err(format!(
            "{ip} is a link-local or cloud metadata address (allow it explicitly with --worker-allow-cidr)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_spelling_of_a_host_is_one_host() {
        for alias in
            ["127.0.0.1", "127.1", "2130706433", "0x7f.0.0.1", "0177.0.0.01", "LOCALHOST", "[::ffff:127.0.0.1]"]
        {
            assert_eq!(canonical_host(alias).unwrap().0, "127.0.0.1", "{alias}");
        }
        assert_eq!(canonical_host("[0:0:0:0:0:0:0:1]").unwrap().0, "[::1]");
        assert_eq!(canonical_host("Worker-3.Example.COM.").unwrap(), ("worker-3.example.com".into(), None));
        for bad in ["0.0.0.0", "0", "[::]", "224.0.0.1", "255.255.255.255", "a b", "[zz]", "256.1.1.1.1", "256.1.1.1"] {
            assert!(canonical_host(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn link_local_and_metadata_need_an_explicit_allow_list() {
        let md: IpAddr = "169.254.169.254".parse().unwrap();
        assert!(worker_ip_allowed(md, &[]).is_err());
        assert!(worker_ip_allowed("fe80::1".parse().unwrap(), &[]).is_err());
        assert!(worker_ip_allowed("100.100.100.200".parse().unwrap(), &[]).is_err());
        assert!(worker_ip_allowed("10.1.2.3".parse().unwrap(), &[]).is_ok());
        let allow: Vec<Cidr> = vec!["10.0.0.0/8".parse().unwrap(), "169.254.0.0/16".parse().unwrap()];
        assert!(worker_ip_allowed(md, &allow).is_ok());
        assert!(worker_ip_allowed("10.9.9.9".parse().unwrap(), &allow).is_ok());
        assert!(worker_ip_allowed("192.168.1.1".parse().unwrap(), &allow).is_err());
        assert!(worker_ip_allowed("::ffff:10.0.0.1".parse().unwrap(), &allow).is_ok());
        assert!("10.0.0.0/33".parse::<Cidr>().is_err() && "x/8".parse::<Cidr>().is_err());
        assert!("::/0".parse::<Cidr>().unwrap().contains("2001:db8::1".parse().unwrap()));
    }
}
