-- Queries of `pgq migrate` (pgq/migrate.py).

-- name: schema_acls
-- returns: many
-- The views and functions of schema %(schema)s that carry privileges of their
-- own (a NULL ACL means the defaults), each with its ACL and a quoted identity
-- for GRANT. Taken before the migrations run: a migration may drop views (and
-- the functions typed by them) that `pgq migrate` then creates again from
-- sql/views/ with default privileges.
SELECT 'TABLE' AS kind, format('%%I.%%I', n.nspname, c.relname) AS ident, c.relacl::text[] AS acl
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = %(schema)s AND c.relkind = 'v' AND c.relacl IS NOT NULL
UNION ALL
SELECT 'FUNCTION', format('%%I.%%I(%%s)', n.nspname, p.proname, oidvectortypes(p.proargtypes)),
       p.proacl::text[]
FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
WHERE n.nspname = %(schema)s AND p.proacl IS NOT NULL
ORDER BY 1, 2;

-- name: acl_recreated
-- returns: one
-- Whether the object %(ident)s exists with default privileges again (it was
-- created anew), and its owner; no row when it does not exist.
SELECT c.relacl IS NULL AS recreated, c.relowner AS owner FROM pg_class c
WHERE %(kind)s = 'TABLE' AND c.oid = to_regclass(%(ident)s)
UNION ALL
SELECT p.proacl IS NULL, p.proowner FROM pg_proc p
WHERE %(kind)s = 'FUNCTION' AND p.oid = to_regprocedure(%(ident)s);

-- name: acl_entries
-- returns: many
-- The entries of ACL %(acl)s but the owner's: grantee (NULL for PUBLIC), privilege,
-- and whether it was granted WITH GRANT OPTION.
SELECT CASE WHEN a.grantee = 0 THEN NULL ELSE pg_get_userbyid(a.grantee) END AS grantee,
       a.privilege_type AS privilege, a.is_grantable AS grantable
FROM aclexplode(%(acl)s::aclitem[]) a
WHERE a.grantee <> %(owner)s::oid
ORDER BY 1, 2;
