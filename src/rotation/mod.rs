//! Lifecycles: when a leaf is refreshed. (The root state machine joins here later.)

mod schedule;

pub use schedule::{RefreshPolicy, DEFAULT_JITTER, DEFAULT_RATIO};
