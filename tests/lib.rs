//! Black-box tests live under `api/`.
