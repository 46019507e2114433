//! The TLS stack of the process: rustls with ring, for every HTTPS client (the control
//! plane, health checks, git pushes and dotfiles clones).

/// Make ring rustls' process-wide crypto provider. Idempotent; every client builder
/// calls it first.
pub fn install_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Err means a provider is installed already, which is all we need.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}
