//! Remote URLs as the save path sees them: the host to find a token for, the HTTPS
//! twin of an SSH remote of a known host, and a form without userinfo for logs.

/// A remote URL parsed just enough for pushing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteUrl {
    /// `https`, `http`, `ssh`, `file`, or `scp` (`git@host:path`).
    pub scheme: String,
    /// `host` or `host:port`, without userinfo.
    pub authority: String,
    /// The path without its leading `/`.
    pub path: String,
    /// The URL as configured (may carry userinfo: never log it).
    pub original: String,
}

impl RemoteUrl {
    pub fn parse(url: &str) -> Option<RemoteUrl> {
        if let Some((scheme, rest)) = url.split_once("://") {
            let scheme = scheme.to_ascii_lowercase();
            if scheme == "file" {
                return Some(RemoteUrl {
                    scheme,
                    authority: String::new(),
                    path: rest.to_string(),
                    original: url.into(),
                });
            }
            let (auth, path) = rest.split_once('/').unwrap_or((rest, ""));
            let authority = auth.rsplit_once('@').map_or(auth, |(_, h)| h);
            return Some(RemoteUrl {
                scheme,
                authority: authority.to_string(),
                path: path.to_string(),
                original: url.into(),
            });
        }
        // scp-like `[user@]host:path`: a colon before any slash.
        if let Some((left, path)) = url.split_once(':')
            && !left.contains('/')
            && !left.is_empty()
        {
            let host = left.rsplit_once('@').map_or(left, |(_, h)| h);
            return Some(RemoteUrl {
                scheme: "scp".into(),
                authority: host.to_string(),
                path: path.trim_start_matches('/').to_string(),
                original: url.into(),
            });
        }
        // A local path.
        Some(RemoteUrl {
            scheme: "file".into(),
            authority: String::new(),
            path: url.to_string(),
            original: url.into(),
        })
    }

    /// The host name without a port.
    pub fn host(&self) -> &str {
        match self.authority.rsplit_once(':') {
            Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) => h,
            _ => &self.authority,
        }
    }

    pub fn is_ssh(&self) -> bool {
        self.scheme == "ssh" || self.scheme == "scp"
    }

    /// The same repository over HTTPS (SSH ports dropped).
    pub fn https_twin(&self) -> String {
        format!("https://{}/{}", self.host(), self.path)
    }

    /// The URL with any userinfo removed: the only form that may be logged.
    pub fn display(&self) -> String {
        redact_userinfo(&self.original)
    }
}

/// Remove `user[:password]@` from a URL.
pub fn redact_userinfo(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://") {
        let (auth, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if let Some((_, host)) = auth.rsplit_once('@') {
            return format!("{scheme}://{host}{path}");
        }
    }
    url.to_string()
}

/// Remove the userinfo of every `scheme://user:pass@host` inside free text (error
/// messages may quote a URL in any form).
pub fn scrub_userinfo(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        out.push_str(&rest[..i + 3]);
        rest = &rest[i + 3..];
        let end = rest
            .find(|c: char| c == '/' || c.is_whitespace() || c == '\'' || c == '"')
            .unwrap_or(rest.len());
        if let Some(at) = rest[..end].rfind('@') {
            rest = &rest[at + 1..];
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssh_forms_of_a_host_have_an_https_twin() {
        let u = RemoteUrl::parse("git@github.com:owner/repo.git").unwrap();
        assert!(u.is_ssh());
        assert_eq!(u.https_twin(), "https://github.com/owner/repo.git");
        let u = RemoteUrl::parse("ssh://git@github.com:22/owner/repo.git").unwrap();
        assert_eq!(u.host(), "github.com");
        assert_eq!(u.https_twin(), "https://github.com/owner/repo.git");
    }

    #[test]
    fn userinfo_never_survives_display() {
        let u = RemoteUrl::parse("https://me:ghp_secret@github.com/o/r.git").unwrap();
        assert_eq!(u.display(), "https://github.com/o/r.git");
        assert_eq!(u.authority, "github.com");
        assert_eq!(
            redact_userinfo("http://a@127.0.0.1:8080/x"),
            "http://127.0.0.1:8080/x"
        );
        assert_eq!(RemoteUrl::parse("/srv/git/r.git").unwrap().scheme, "file");
        assert_eq!(
            scrub_userinfo("failed: 'https://u:p@h.io/x' and http://t@h2 end"),
            "failed: 'https://h.io/x' and http://h2 end"
        );
    }
}
