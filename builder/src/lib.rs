//! mwbuild
