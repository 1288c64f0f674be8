//! Shared helpers for the end-to-end tests (start the real daemon, fixture trees).
