//! Evaluation: degradation synthesis (Real-ESRGAN's second-order pipeline) and image metrics.

pub mod degrade;
pub mod metrics;
