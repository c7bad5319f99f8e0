fn main() -> std::process::ExitCode {
    ven::cli::main()
}
