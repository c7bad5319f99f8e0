//! History of the last firewall changes (the spec's automatic history). Being built for issue 3.
