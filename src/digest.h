/*-------------------------------------------------------------------------
 *
 * digest.h
 *	  Bytes rendered as text (digest.c): "hex:" strings for what is not
 *	  text, and SHA-256 digests.
 *
 *-------------------------------------------------------------------------
 */
#ifndef MQTX_DIGEST_H
#define MQTX_DIGEST_H

extern char *mqtx_hex_string(const char *data, int len);
extern char *mqtx_sha256_hex(const char *data, size_t len);

#endif							/* MQTX_DIGEST_H */
