//! The Istio sidecar bootstrap fix, pure part: decide how to mount the
//! patched Envoy bootstrap template into a pod's `istio-proxy`.

/// An Istio `major.minor` version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version {
    /// Major version.
    pub major: u32,
    /// Minor version.
    pub minor: u32,
}

/// Parses `1.5`, `1.5.4`, `1.7.0-beta.1`, `1.5.4-distroless`, with an
/// optional leading `v`. Anything else (`latest`, a digest) is `None`.
pub fn parse_version(s: &str) -> Option<Version> {
    let s = s.strip_prefix('v').unwrap_or(s);
    let core = s.split(['-', '+']).next()?;
    let mut parts = core.split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    if let Some(patch) = parts.next() {
        patch.parse::<u32>().ok()?;
    }
    if parts.next().is_some() {
        return None;
    }
    Some(Version { major, minor })
}
