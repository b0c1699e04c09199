//! `scap-bridge`: not built yet; see ARCHITECTURE.md for what this crate will own.
