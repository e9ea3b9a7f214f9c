//! `s3://BUCKET/PREFIX` locations.

use std::fmt;

/// Where a pushed checkpoint lives: a bucket and a key prefix (no leading or
/// trailing slash; may be empty).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct S3Url {
    /// Bucket name.
    pub bucket: String,
    /// Key prefix inside the bucket, without leading or trailing `/`.
    pub prefix: String,
}

/// Why a location is not an `s3://` URL ckptfs can use.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{url:?} is not an s3://BUCKET/PREFIX location: {why}")]
pub struct UrlError {
    url: String,
    why: &'static str,
}

/// Whether `s` names an object-store location rather than a local file.
pub fn is_remote(s: &str) -> bool {
    s.starts_with("s3://")
}

impl S3Url {
    /// Parse `s3://BUCKET/PREFIX` (the prefix may be empty; `..` and empty
    /// path segments are refused, so the keys written are the keys read).
    pub fn parse(s: &str) -> Result<S3Url, UrlError> {
        let bad = |why| UrlError {
            url: s.to_owned(),
            why,
        };
        let rest = s
            .strip_prefix("s3://")
            .ok_or(bad("it does not start with s3://"))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let prefix = prefix.trim_end_matches('/');
        let bucket_ok = (3..=63).contains(&bucket.len())
            && bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
        if !bucket_ok {
            return Err(bad(
                "the bucket name must be 3-63 characters of a-z, 0-9, '-' and '.'",
            ));
        }
        if !prefix.is_empty()
            && prefix
                .split('/')
                .any(|seg| seg.is_empty() || seg == "." || seg == "..")
        {
            return Err(bad("the prefix has an empty, '.' or '..' segment"));
        }
        if prefix.bytes().any(|b| b.is_ascii_control()) {
            return Err(bad("the prefix has a control character"));
        }
        Ok(S3Url {
            bucket: bucket.to_owned(),
            prefix: prefix.to_owned(),
        })
    }

    /// The key of `name` under the prefix.
    pub fn key(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_owned()
        } else {
            format!("{}/{name}", self.prefix)
        }
    }
}

impl fmt::Display for S3Url {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "s3://{}/{}", self.bucket, self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_and_prefix_are_split() {
        let u = S3Url::parse("s3://ckpt/vms/a/").unwrap();
        assert_eq!((u.bucket.as_str(), u.prefix.as_str()), ("ckpt", "vms/a"));
        assert_eq!(u.key("manifest"), "vms/a/manifest");
        assert_eq!(u.to_string(), "s3://ckpt/vms/a");
        assert_eq!(S3Url::parse("s3://ckpt").unwrap().key("m"), "m");
    }

    #[test]
    fn bad_locations_are_refused() {
        for s in [
            "/tmp/x",
            "s3://",
            "s3://AB/x",
            "s3://ok-bucket/a//b",
            "s3://ok-bucket/../b",
        ] {
            assert!(S3Url::parse(s).is_err(), "{s}");
        }
        assert!(is_remote("s3://a/b") && !is_remote("vm.ckpt"));
    }
}
