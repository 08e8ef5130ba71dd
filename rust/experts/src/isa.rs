//! The instruction-set tiers the kernels are written for, and which of them this CPU runs.

use crate::ExpertsError;

/// An instruction-set tier of the kernels. Every tier computes each output element in one
/// fixed order (see the crate documentation); tiers differ from each other in rounding only
/// (the vector tiers fuse each multiply-add, the generic one rounds the product and the sum).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Isa {
    /// Portable Rust that the compiler vectorises for the build's baseline (SSE2 on x86_64).
    Generic,
    /// AVX2 with FMA (x86_64).
    Avx2,
    /// AVX-512F (x86_64).
    Avx512,
    /// NEON (aarch64).
    Neon,
}

impl Isa {
    /// Every tier, best first.
    pub const ALL: [Isa; 4] = [Isa::Avx512, Isa::Avx2, Isa::Neon, Isa::Generic];

    /// The tier's name: `generic`, `avx2`, `avx512` or `neon`.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Generic => "generic",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
            Isa::Neon => "neon",
        }
    }

    /// Whether this CPU runs the tier.
    pub fn supported(self) -> bool {
        match self {
            Isa::Generic => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma"),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => {
                std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
            }
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => std::arch::is_aarch64_feature_detected!("neon"),
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// The tiers this CPU runs, best first; the last is always [`Isa::Generic`].
    pub fn available() -> Vec<Isa> {
        Isa::ALL.into_iter().filter(|isa| isa.supported()).collect()
    }

    /// The best tier this CPU runs.
    pub fn best() -> Isa {
        Isa::available()[0]
    }

    /// `Ok(self)` when this CPU runs the tier, else an [`ExpertsError::Isa`] naming the tiers it runs.
    pub fn check(self) -> Result<Isa, ExpertsError> {
        if self.supported() {
            return Ok(self);
        }
        Err(ExpertsError::Isa(format!(
            "the {} kernels need an instruction set this CPU lacks (available: {})",
            self.name(),
            available_names()
        )))
    }
}

fn available_names() -> String {
    Isa::available().iter().map(|i| i.name()).collect::<Vec<_>>().join(", ")
}

impl std::fmt::Display for Isa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Isa {
    type Err = ExpertsError;

    /// A tier by its [`name`](Isa::name); an unknown name is an [`ExpertsError::Isa`] naming
    /// the tiers this CPU runs.
    fn from_str(name: &str) -> Result<Isa, ExpertsError> {
        Isa::ALL.into_iter().find(|isa| isa.name() == name).ok_or_else(|| {
            ExpertsError::Isa(format!(
                "unknown instruction-set tier {name:?} (known: generic, avx2, avx512, neon; available: {})",
                available_names()
            ))
        })
    }
}
