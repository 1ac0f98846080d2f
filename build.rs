//! Turns what nginx-sys learnt from the configured nginx tree into cfgs for this crate:
//! `ngx_feature = "..."`, `ngx_os = "..."` and `ngx_version_ge_1_25` style version gates.
//!
//! nginx-sys exports these as `DEP_NGINX_*`, which cargo only hands to direct dependents:
//! that is why `nginx-sys` is listed in `[dependencies]` next to `ngx`.

use std::env;

fn main() {
    emit_list_cfg("ngx_feature", "FEATURES");
    emit_list_cfg("ngx_os", "OS");

    // Version gates we use; nginx-sys gives the number as MMMmmmppp (1.22.1 = 1022001).
    const GATES: &[(&str, u64)] = &[("ngx_1_25", 1_025_000), ("ngx_1_27", 1_027_000)];
    for (name, _) in GATES {
        println!("cargo::rustc-check-cfg=cfg({name})");
    }
    println!("cargo::rerun-if-env-changed=DEP_NGINX_VERSION_NUMBER");
    let version =
        env::var("DEP_NGINX_VERSION_NUMBER").ok().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    for (name, min) in GATES {
        if version >= *min {
            println!("cargo::rustc-cfg={name}");
        }
    }
    if let Ok(v) = env::var("DEP_NGINX_VERSION") {
        println!("cargo::rustc-env=PGPUSH_NGINX_VERSION={v}");
    } else {
        println!("cargo::rustc-env=PGPUSH_NGINX_VERSION=unknown");
    }
    println!("cargo::rerun-if-env-changed=DEP_NGINX_VERSION");
}

/// Declares the accepted values of `cfg(name)` and sets the ones nginx-sys detected.
fn emit_list_cfg(name: &str, var: &str) {
    let check = format!("DEP_NGINX_{var}_CHECK");
    let value = format!("DEP_NGINX_{var}");
    println!("cargo::rerun-if-env-changed={check}");
    println!("cargo::rerun-if-env-changed={value}");
    let accepted = env::var(&check).unwrap_or_else(|_| "any()".to_string());
    println!("cargo::rustc-check-cfg=cfg({name}, values({accepted}))");
    if let Ok(list) = env::var(&value) {
        for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            println!("cargo::rustc-cfg={name}=\"{item}\"");
        }
    }
}
