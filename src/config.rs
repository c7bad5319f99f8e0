//! The agent's configuration: board profile values (caps, fail-safe services, interfaces).
//! Being built for issue 3.
