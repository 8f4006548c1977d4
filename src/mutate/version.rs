//! Istio versions: `major.minor`, read from an image tag or a setting.
//! A leaf: the policy (which checks `istio.proxyVersion`) and the keepalive
//! decision both read versions, and neither imports the other for it.

/// An Istio `major.minor` version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version {
    /// Major version.
    pub major: u32,
    /// Minor version.
    pub minor: u32,
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
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

/// The tag of an image reference (`docker.io/istio/proxyv2:1.5.4` ->
/// `1.5.4`), ignoring a digest; `None` without a tag.
pub fn image_tag(image: &str) -> Option<&str> {
    let without_digest = image.split('@').next()?;
    let last = without_digest.rsplit('/').next()?;
    last.split_once(':').map(|(_, tag)| tag)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions() {
        assert_eq!(parse_version("1.5"), Some(Version { major: 1, minor: 5 }));
        assert_eq!(parse_version("1.5.4"), Some(Version { major: 1, minor: 5 }));
        assert_eq!(
            parse_version("v1.7.0-beta.1"),
            Some(Version { major: 1, minor: 7 })
        );
        assert_eq!(
            parse_version("1.5.4-distroless"),
            Some(Version { major: 1, minor: 5 })
        );
        for bad in ["latest", "", "1", "1.x", "1.5.4.3", "sha256:abc"] {
            assert_eq!(parse_version(bad), None, "{bad}");
        }
    }

    #[test]
    fn image_tags() {
        assert_eq!(image_tag("docker.io/istio/proxyv2:1.5.4"), Some("1.5.4"));
        assert_eq!(
            image_tag("localhost:5000/istio/proxyv2:1.7.0"),
            Some("1.7.0")
        );
        assert_eq!(image_tag("localhost:5000/istio/proxyv2"), None);
        assert_eq!(image_tag("istio/proxyv2@sha256:abcd"), None);
        assert_eq!(image_tag("istio/proxyv2:1.6.1@sha256:abcd"), Some("1.6.1"));
    }
}
