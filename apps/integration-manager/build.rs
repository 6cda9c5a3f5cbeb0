//! Link settings of the service's binary (docs/architecture.md, "Memory").

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    // Relative relocations packed (DT_RELR, glibc 2.36 and later): the loader applies them from
    // a bitmap of a few kilobytes instead of reading a 24-byte entry for each of the binary's
    // 80,000 pointers, whose 1.9 MB would otherwise stay resident in every instance.
    let target = std::env::var("TARGET").unwrap_or_default();
    if target.ends_with("-linux-gnu") {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}
