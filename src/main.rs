//! The `dinghook` binary. The command line itself is the library's [`dinghook::cli`], so a
//! program that registers its own handlers can offer the same commands.

fn main() -> std::process::ExitCode {
    dinghook::cli::main()
}
