/*-------------------------------------------------------------------------
 *
 * digest.c
 *	  Bytes rendered as text: the consumer stores ids, keys and headers that
 *	  are not valid text as "hex:" strings, and names deliveries and
 *	  refusals by SHA-256 digests.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "common/cryptohash.h"
#include "utils/builtins.h"

#include "digest.h"

/*
 * "hex:" and the hexadecimal digits of len bytes: how the consumer stores
 * strings that are not text it can keep as they are.
 */
char *
mqtx_hex_string(const char *data, int len)
{
	char	   *hex = palloc(4 + 2 * len + 1);

	memcpy(hex, "hex:", 4);
	hex_encode(data, len, hex + 4);
	hex[4 + 2 * len] = '\0';
	return hex;
}

/*
 * The hexadecimal SHA-256 of len bytes.  In a transaction: with OpenSSL,
 * the digest is a resource of its resource owner.
 */
char *
mqtx_sha256_hex(const char *data, size_t len)
{
	pg_cryptohash_ctx *ctx = pg_cryptohash_create(PG_SHA256);
	uint8		digest[32];
	char	   *hex = palloc(65);

	if (ctx == NULL || pg_cryptohash_init(ctx) < 0 ||
		pg_cryptohash_update(ctx, (const uint8 *) data, len) < 0 ||
		pg_cryptohash_final(ctx, digest, sizeof(digest)) < 0)
		elog(ERROR, "could not compute a SHA-256 digest");
	pg_cryptohash_free(ctx);
	hex_encode((char *) digest, sizeof(digest), hex);
	hex[64] = '\0';
	return hex;
}
