//! Outcome classification: which results count against a dependency.

/// How a finished call counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The dependency worked.
    Success,
    /// The dependency failed.
    Failure,
    /// Says nothing about the dependency's health (a client error, a rate limit): not recorded;
    /// a half-open probe that is ignored gives its permit back.
    Ignored,
}

/// Maps a call's result to an [`Outcome`]. Implemented for closures.
///
/// ```
/// use stanchion_breaker::{Classifier, Outcome};
/// // HTTP status codes: 5xx fail, 429 says nothing, anything else succeeds.
/// let by_status = |r: &Result<u16, std::io::Error>| match r {
///     Ok(429) => Outcome::Ignored,
///     Ok(s) if *s >= 500 => Outcome::Failure,
///     Ok(_) => Outcome::Success,
///     Err(_) => Outcome::Failure,
/// };
/// assert_eq!(by_status.classify(&Ok(503)), Outcome::Failure);
/// assert_eq!(by_status.classify(&Ok(404)), Outcome::Success);
/// assert_eq!(by_status.classify(&Ok(429)), Outcome::Ignored);
/// fn _object_safe(_: &dyn Classifier<u16, std::io::Error>) {}
/// ```
pub trait Classifier<T, E> {
    /// Classifies one result.
    fn classify(&self, result: &Result<T, E>) -> Outcome;
}

/// `Ok` is a success, `Err` a failure.
///
/// ```
/// use stanchion_breaker::{Classifier, DefaultClassifier, Outcome};
/// assert_eq!(DefaultClassifier.classify(&Err::<(), _>("x")), Outcome::Failure);
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct DefaultClassifier;

impl<T, E> Classifier<T, E> for DefaultClassifier {
    #[inline]
    fn classify(&self, result: &Result<T, E>) -> Outcome {
        match result {
            Ok(_) => Outcome::Success,
            Err(_) => Outcome::Failure,
        }
    }
}

impl<T, E, F> Classifier<T, E> for F
where
    F: Fn(&Result<T, E>) -> Outcome,
{
    #[inline]
    fn classify(&self, result: &Result<T, E>) -> Outcome {
        self(result)
    }
}
