//! An IP address with a prefix length, as used for interface addresses and set members.

use serde::{Deserialize, Serialize};
use std::net::IpAddr;

/// An address and prefix length. The address may have host bits set (an interface address such as
/// `198.18.0.2/24`); [`IpNet::network`] clears them. The prefix never exceeds the family's width:
/// both parsing and decoding reject it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "(IpAddr, u8)", into = "(IpAddr, u8)")]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IpNetError {
    #[error("invalid address {0:?}")]
    Address(String),
    #[error("invalid prefix length {prefix} for {addr} (at most {max})")]
    Prefix { addr: IpAddr, prefix: String, max: u8 },
}

impl IpNet {
    pub fn new(addr: IpAddr, prefix: u8) -> Result<Self, IpNetError> {
        let max = max_prefix(addr);
        if prefix > max {
            return Err(IpNetError::Prefix { addr, prefix: prefix.to_string(), max });
        }
        Ok(Self { addr, prefix })
    }

    /// A single host (/32 or /128).
    pub fn host(addr: IpAddr) -> Self {
        Self { addr, prefix: max_prefix(addr) }
    }

    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    pub fn is_ipv4(&self) -> bool {
        self.addr.is_ipv4()
    }

    /// The same prefix with the host bits cleared.
    pub fn network(&self) -> Self {
        let addr = match self.addr {
            IpAddr::V4(v4) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                IpAddr::V4((u32::from(v4) & mask).into())
            }
            IpAddr::V6(v6) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                IpAddr::V6((u128::from(v6) & mask).into())
            }
        };
        Self { addr, prefix: self.prefix }
    }
}

fn max_prefix(addr: IpAddr) -> u8 {
    if addr.is_ipv4() { 32 } else { 128 }
}

impl TryFrom<(IpAddr, u8)> for IpNet {
    type Error = IpNetError;
    fn try_from((addr, prefix): (IpAddr, u8)) -> Result<Self, Self::Error> {
        Self::new(addr, prefix)
    }
}

impl From<IpNet> for (IpAddr, u8) {
    fn from(net: IpNet) -> Self {
        (net.addr, net.prefix)
    }
}

impl std::fmt::Display for IpNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl std::str::FromStr for IpNet {
    type Err = IpNetError;
    /// Parses `ADDR/PREFIX` or a bare `ADDR` (a single host).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr_text, prefix_text) = match s.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (s, None),
        };
        let addr: IpAddr = addr_text.parse().map_err(|_| IpNetError::Address(s.to_string()))?;
        match prefix_text {
            None => Ok(Self::host(addr)),
            Some(text) => {
                let prefix = text.parse::<u8>().map_err(|_| IpNetError::Prefix {
                    addr,
                    prefix: text.to_string(),
                    max: max_prefix(addr),
                })?;
                Self::new(addr, prefix)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hosts_and_prefixes() {
        assert_eq!("198.18.0.2".parse::<IpNet>().unwrap().to_string(), "198.18.0.2/32");
        assert_eq!("2001:db8::1".parse::<IpNet>().unwrap().to_string(), "2001:db8::1/128");
        assert_eq!("198.18.0.2/24".parse::<IpNet>().unwrap().network().to_string(), "198.18.0.0/24");
        assert_eq!("2001:db8::1/64".parse::<IpNet>().unwrap().network().to_string(), "2001:db8::/64");
        assert_eq!("0.0.0.0/0".parse::<IpNet>().unwrap().network().to_string(), "0.0.0.0/0");
    }

    #[test]
    fn rejects_bad_prefixes_and_addresses() {
        assert!("198.18.0.2/33".parse::<IpNet>().is_err());
        assert!("198.18.0.2/x".parse::<IpNet>().is_err());
        assert!("2001:db8::/129".parse::<IpNet>().is_err());
        assert!("198.18.0.256".parse::<IpNet>().is_err());
    }

    #[test]
    fn decoding_rejects_an_impossible_prefix() {
        let bytes = postcard::to_allocvec(&(IpAddr::from([198, 18, 0, 1]), 40u8)).unwrap();
        assert!(postcard::from_bytes::<IpNet>(&bytes).is_err());
        let bytes = postcard::to_allocvec(&(IpAddr::from([198, 18, 0, 1]), 24u8)).unwrap();
        assert_eq!(postcard::from_bytes::<IpNet>(&bytes).unwrap().prefix(), 24);
    }
}
