# Appends the cargo rule for the Rust static library to nginx's Makefile (see config).

pgpush_src_dir=$(cd "$ngx_addon_dir" && pwd)
pgpush_ngx_src=$(pwd)
pgpush_ngx_objs=$(cd "$NGX_OBJS" && pwd)

cat << END                                                    >> $NGX_MAKEFILE

# pgpush: always ask cargo, it knows whether anything changed
.PHONY: $PGPUSH_LIB

$PGPUSH_LIB:
	NGINX_SOURCE_DIR="$pgpush_ngx_src" NGINX_BUILD_DIR="$pgpush_ngx_objs" \\
	$PGPUSH_CARGO rustc \\
		--manifest-path "$pgpush_src_dir/Cargo.toml" \\
		--lib --crate-type staticlib \\
		--no-default-features \\
		--profile $PGPUSH_CARGO_PROFILE \\
		--target-dir "$pgpush_ngx_objs/addon/pgpush"

END

if [ "$PGPUSH_LINK" = DYNAMIC ]; then
    cat << END                                                >> $NGX_MAKEFILE
$NGX_OBJS${ngx_dirsep}ngx_http_pgpush_module$ngx_modext: $PGPUSH_LIB

END
fi
