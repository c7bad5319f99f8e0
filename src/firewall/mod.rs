//! PlatformHandler: policy to iptables/ipset rendering and applying (being written).
