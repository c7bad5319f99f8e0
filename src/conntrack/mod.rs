//! conntrack: the established-connection timeout and cutting connections a tightened policy no
//! longer allows (ctnetlink). Being built for issue 3.
