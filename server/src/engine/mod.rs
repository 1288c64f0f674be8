//! The engine (STUB).
