"""The device's TPM, through tpm2-pytss (ESAPI).

Works with any TCTI: ``swtpm:host=127.0.0.1,port=2321`` for the simulator,
``device:/dev/tpmrm0`` for a real TPM behind the kernel resource manager,
``tabrmd`` for the access broker. Every transient handle and session created
here is flushed (the simulator has no resource manager to do it).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from tpm2_pytss import ESAPI, TSS2_Exception
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_RH, TPM2_SE, TPMA_OBJECT
from tpm2_pytss.tsskey import TSSPrivKey
from tpm2_pytss.types import (
    TPM2B_ENCRYPTED_SECRET,
    TPM2B_ID_OBJECT,
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPML_DIGEST,
    TPML_PCR_SELECTION,
    TPMS_PCR_SELECTION,
    TPMT_PUBLIC,
    TPMT_SIG_SCHEME,
    TPMT_SYM_DEF,
)
from tpm2_pytss.utils import NoSuchIndex, NVReadEK, create_ek_template

# Where the AK is kept between boots (TCG "Registry of reserved TPM 2.0
# handles": 0x81010002 and up are for endorsement-hierarchy keys like AKs).
DEFAULT_AK_HANDLE = 0x81010002

# TCG EK Credential Profile: which EK certificate/template to look for.
EK_TYPES = {"rsa": "EK-RSA2048", "ecc": "EK-HIGH-ECC384"}
# TCG EK Credential Profile 2.0, B.6: the high-range (P-384) EK's authPolicy is
# PolicyOR(PolicyA, PolicyB) in SHA-384; PolicyA is PolicySecret(TPM_RH_ENDORSEMENT).
EK_POLICY_A_SHA384 = bytes.fromhex(
    "8bbf2266537c171cb56e403c4dc1d4b64f432611dc386e6f532050c3278c930e"
    "143e8bb1133824ccb431053871c6db53"
)
EK_POLICY_B_SHA384 = bytes.fromhex(
    "d6032ce61f2fb3c240eb3cf6a33237ef2b6a16f4293c22b455e261cffd217ad5"
    "b4947c2d73e63005eed2dc2b3593d165"
)

_AK_ATTRS = (
    TPMA_OBJECT.RESTRICTED
    | TPMA_OBJECT.SIGN_ENCRYPT
    | TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN
    | TPMA_OBJECT.USERWITHAUTH
)
# The TLS client key: a plain ECDSA P-256 signing key in the owner hierarchy, created
# under the SRK that tpm2-openssl also derives (TSSPrivKey), kept as a TSS2 PEM. Its
# sensitive part never leaves the TPM (fixedTPM, fixedParent, sensitiveDataOrigin),
# and it is neither restricted nor a decryption key: what attestd certifies and
# binds the session credential to (attestd/core/certify.py).
TLS_KEY_ATTRS = (
    TPMA_OBJECT.SIGN_ENCRYPT
    | TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN
    | TPMA_OBJECT.USERWITHAUTH
)
TLS_KEY_ALG = "ecc256:ecdsa-sha256"
_AK_TEMPLATES = {"rsa": "rsa2048:rsassa-sha256:null", "ecc": "ecc256:ecdsa-sha256:null"}
_BANK_ALGS = {
    "sha1": TPM2_ALG.SHA1,
    "sha256": TPM2_ALG.SHA256,
    "sha384": TPM2_ALG.SHA384,
    "sha512": TPM2_ALG.SHA512,
}


class AgentError(Exception):
    """The TPM could not do what the agent asked; the message says what."""


class KeyUnusableError(AgentError):
    """A saved key can no longer be used in this TPM (wrong TPM, or its owner seed changed)."""


@dataclass(frozen=True)
class Quote:
    attest: bytes  # TPMS_ATTEST
    signature: bytes  # TPMT_SIGNATURE
    pcrs: dict[str, dict[int, bytes]]


@dataclass(frozen=True)
class CertifiedKey:
    """A key and its TPM2_Certify by the AK, as the Attest RPC carries them."""

    public: bytes  # TPM2B_PUBLIC of the key
    certify_info: bytes  # TPMS_ATTEST (the contents of the TPM2B_ATTEST)
    signature: bytes  # TPMT_SIGNATURE by the AK over certify_info


def tls_key_template() -> TPMT_PUBLIC:
    """ECC P-256, ECDSA-SHA256, ``TLS_KEY_ATTRS``; nameAlg SHA-256."""
    return TPMT_PUBLIC.parse(alg=TLS_KEY_ALG, objectAttributes=TLS_KEY_ATTRS)


def tls_key_problem(pem: bytes) -> str | None:
    """Why a saved TSS2 PEM is not a key the agent would have made, or None if it is.

    Checks the file's own public area (the TPM will check the private part when it
    loads it): ECC P-256, ECDSA with SHA-256, exactly ``TLS_KEY_ATTRS``, empty auth.
    """
    try:
        key = TSSPrivKey.from_pem(pem)
        public = key.public.publicArea
    except Exception as e:  # malformed PEM or DER: the parsers raise several kinds
        return f"not a TSS2 private key ({e})"
    want = tls_key_template()
    ecc, want_ecc = public.parameters.eccDetail, want.parameters.eccDetail
    if public.type != TPM2_ALG.ECC or ecc.curveID != want_ecc.curveID:
        return "not an ECC P-256 key"
    if ecc.scheme.scheme != TPM2_ALG.ECDSA or ecc.scheme.details.ecdsa.hashAlg != TPM2_ALG.SHA256:
        return "not an ECDSA-SHA256 key"
    if int(public.objectAttributes) != int(TLS_KEY_ATTRS):
        return f"attributes {public.objectAttributes} are not {TLS_KEY_ATTRS}"
    if not key.empty_auth or key.parent != TPM2_RH.OWNER:
        return "not a key with empty auth under the owner hierarchy's SRK"
    return None


class DeviceTpm:
    def __init__(self, tcti: str) -> None:
        try:
            self.ectx = ESAPI(tcti)
        except TSS2_Exception as e:
            raise AgentError(f"cannot open the TPM through TCTI {tcti!r}: {e}") from None

    def close(self) -> None:
        self.ectx.close()

    def __enter__(self) -> DeviceTpm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _transient(self, handle: ESYS_TR) -> Iterator[ESYS_TR]:
        try:
            yield handle
        finally:
            self.ectx.flush_context(handle)

    # -- EK ----------------------------------------------------------------

    def endorsement(self, ek_type: str = "rsa") -> tuple[bytes, bytes]:
        """(EK certificate DER, EK TPM2B_PUBLIC): the cert from NV, the key from its template."""
        try:
            cert, template = create_ek_template(EK_TYPES[ek_type], NVReadEK(self.ectx))
        except (ValueError, NoSuchIndex) as e:
            raise AgentError(f"no {ek_type} EK certificate in this TPM's NV storage: {e}") from None
        if not cert:
            raise AgentError(f"no {ek_type} EK certificate in this TPM's NV storage")
        with self._ek(template) as (_, public):
            return bytes(cert), bytes(public.marshal())

    @contextmanager
    def _ek(self, template: TPM2B_PUBLIC) -> Iterator[tuple[ESYS_TR, TPM2B_PUBLIC]]:
        handle, public, _, _, _ = self.ectx.create_primary(
            TPM2B_SENSITIVE_CREATE(), template, ESYS_TR.ENDORSEMENT
        )
        with self._transient(handle):
            yield handle, public

    # -- AK ----------------------------------------------------------------

    def ak_public(self, handle: int = DEFAULT_AK_HANDLE) -> bytes | None:
        """The persisted AK's TPM2B_PUBLIC, or None when there is none."""
        tr = self._persistent(handle)
        if tr is None:
            return None
        public, _, _ = self.ectx.read_public(tr)
        return bytes(public.marshal())

    def _persistent(self, handle: int) -> ESYS_TR | None:
        try:
            return self.ectx.tr_from_tpmpublic(handle)
        except TSS2_Exception:
            return None

    @contextmanager
    def new_ak(self, alg: str = "rsa") -> Iterator[tuple[ESYS_TR, bytes]]:
        """A fresh transient AK in the endorsement hierarchy: (handle, TPM2B_PUBLIC).

        A random ``unique`` makes the primary key new each time, so re-enrolling
        really yields a different key. It stays transient (and is flushed) until
        ``persist_ak``: an enrollment that fails leaves the old AK in place.
        """
        tmpl = TPMT_PUBLIC.parse(alg=_AK_TEMPLATES[alg], objectAttributes=_AK_ATTRS)
        if alg == "rsa":
            tmpl.unique.rsa = secrets.token_bytes(32)
        else:
            tmpl.unique.ecc.x = secrets.token_bytes(32)
        tr, public, _, _, _ = self.ectx.create_primary(
            TPM2B_SENSITIVE_CREATE(), TPM2B_PUBLIC(publicArea=tmpl), ESYS_TR.ENDORSEMENT
        )
        with self._transient(tr):
            yield tr, bytes(public.marshal())

    def create_ak(self, alg: str = "rsa", handle: int = DEFAULT_AK_HANDLE) -> bytes:
        """Create a new AK and persist it at ``handle`` at once; returns its TPM2B_PUBLIC."""
        with self.new_ak(alg) as (tr, public):
            self.persist_ak(tr, handle)
        return public

    def persist_ak(self, tr: ESYS_TR, handle: int = DEFAULT_AK_HANDLE) -> None:
        """Make ``tr`` the AK kept at ``handle``, replacing any previous one."""
        old = self._persistent(handle)
        if old is not None:
            self.ectx.evict_control(ESYS_TR.OWNER, old, handle)
        self.ectx.evict_control(ESYS_TR.OWNER, tr, handle)

    def persistent_ak(self, handle: int = DEFAULT_AK_HANDLE) -> ESYS_TR:
        tr = self._persistent(handle)
        if tr is None:
            raise AgentError(f"no AK at handle 0x{handle:08x}; enroll first")
        return tr

    # -- The TLS client key ----------------------------------------------

    def create_tls_key(self) -> bytes:
        """Create a new TLS client key (``tls_key_template``); returns its TSS2 PEM.

        The key is created under the owner hierarchy's SRK (an ECC P-256 primary
        from the TCG template, derived anew on each load, as tpm2-openssl does) and
        returned wrapped by it: only this TPM, with this owner seed, can load it.
        The transient SRK is flushed before returning.
        """
        try:
            key = TSSPrivKey.create(self.ectx, tls_key_template())
        except TSS2_Exception as e:
            raise AgentError(f"cannot create the TLS key: {e}") from None
        return bytes(key.to_pem())

    @contextmanager
    def load_tls_key(self, pem: bytes) -> Iterator[tuple[ESYS_TR, bytes]]:
        """Load a TSS2 PEM into the TPM: (transient handle, TPM2B_PUBLIC), flushed on exit.

        Raises KeyUnusableError when the TPM refuses the key itself (another TPM's
        key, or the owner hierarchy was cleared), AgentError for anything else.
        """
        try:
            key = TSSPrivKey.from_pem(pem)
        except Exception as e:  # malformed PEM or DER: the parsers raise several kinds
            raise KeyUnusableError(f"not a TSS2 private key: {e}") from None
        try:
            # Creates the SRK, loads the key under it, flushes the SRK.
            handle = key.load(self.ectx)
        except TSS2_Exception as e:
            if _refuses_object(e):
                raise KeyUnusableError(f"the TPM cannot load this key: {e}") from None
            raise AgentError(f"cannot load the TLS key: {e}") from None
        with self._transient(handle):
            yield handle, bytes(key.public.marshal())

    def certify_tls_key(
        self, pem: bytes, nonce: bytes, ak_handle: int = DEFAULT_AK_HANDLE
    ) -> CertifiedKey:
        """TPM2_Certify the key in ``pem`` with the AK over ``nonce``."""
        ak = self.persistent_ak(ak_handle)
        with self.load_tls_key(pem) as (key, public):
            try:
                attest, signature = self.ectx.certify(
                    key,
                    ak,
                    nonce,
                    TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL),
                    session1=ESYS_TR.PASSWORD,  # the key's (empty) auth
                    session2=ESYS_TR.PASSWORD,  # the AK's (empty) auth
                )
            except TSS2_Exception as e:
                raise AgentError(f"TPM2_Certify failed: {e}") from None
        return CertifiedKey(public, bytes(attest), bytes(signature.marshal()))

    # -- ActivateCredential -----------------------------------------------

    def activate(
        self,
        credential_blob: bytes,
        encrypted_secret: bytes,
        ek_type: str = "rsa",
        ak_handle: int = DEFAULT_AK_HANDLE,
        ak: ESYS_TR | None = None,
    ) -> bytes:
        """TPM2_ActivateCredential with the AK (``ak``, else the persisted one) and the EK.

        The EK authorizes through its policy: PolicySecret(TPM_RH_ENDORSEMENT), and for
        the high-range EK that ORed with PolicyB of the TCG EK Credential Profile.
        """
        _, template = create_ek_template(EK_TYPES[ek_type], NVReadEK(self.ectx))
        if ak is None:
            ak = self.persistent_ak(ak_handle)
        blob, _ = TPM2B_ID_OBJECT.unmarshal(credential_blob)
        secret, _ = TPM2B_ENCRYPTED_SECRET.unmarshal(encrypted_secret)
        with self._ek(template) as (ek, _):
            high_range = ek_type == "ecc"
            session = self.ectx.start_auth_session(
                ESYS_TR.NONE,
                ESYS_TR.NONE,
                TPM2_SE.POLICY,
                TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL),
                TPM2_ALG.SHA384 if high_range else TPM2_ALG.SHA256,
            )
            with self._transient(session):
                self.ectx.policy_secret(ESYS_TR.ENDORSEMENT, session, b"", b"", b"", 0)
                if high_range:
                    self.ectx.policy_or(
                        session, TPML_DIGEST([EK_POLICY_A_SHA384, EK_POLICY_B_SHA384])
                    )
                try:
                    cred = self.ectx.activate_credential(
                        ak, ek, blob, secret, session1=ESYS_TR.PASSWORD, session2=session
                    )
                except TSS2_Exception as e:
                    raise AgentError(f"TPM2_ActivateCredential failed: {e}") from None
        return bytes(cred)

    # -- Quote and PCRs --------------------------------------------------

    def quote(
        self,
        selection: Sequence[tuple[str, Sequence[int]]],
        nonce: bytes,
        ak_handle: int = DEFAULT_AK_HANDLE,
    ) -> Quote:
        """Quote the selection over ``nonce`` with the AK, then read the quoted values."""
        ak = self.persistent_ak(ak_handle)
        sel = _selection(selection)
        attest, signature = self.ectx.quote(ak, sel, nonce, TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL))
        return Quote(bytes(attest), bytes(signature.marshal()), self.read_pcrs(selection))

    def read_pcrs(
        self, selection: Sequence[tuple[str, Sequence[int]]]
    ) -> dict[str, dict[int, bytes]]:
        out: dict[str, dict[int, bytes]] = {}
        for bank, indices in selection:
            values: dict[int, bytes] = {}
            pending = sorted(set(indices))
            # TPM2_PCR_Read answers at most 8 digests per call.
            while pending:
                _, read_sel, digests = self.ectx.pcr_read(_selection([(bank, pending)]))
                got = _indices(read_sel)
                if not got:
                    raise AgentError(f"the TPM has no {bank} bank or no such PCRs")
                for i, d in zip(got, digests, strict=True):
                    values[i] = bytes(d)
                pending = [i for i in pending if i not in values]
            out[bank] = values
        return out


def _refuses_object(e: TSS2_Exception) -> bool:
    """A TPM (not transport) error tied to a parameter or handle, e.g. TPM_RC_INTEGRITY.

    Those mean the object itself is refused; warnings such as TPM_RC_OBJECT_MEMORY
    and transport errors are not about the key and may pass.
    """
    rc = int(e.rc)
    return rc & 0xFFFF0000 == 0 and bool(rc & 0x80)


def _selection(selection: Sequence[tuple[str, Sequence[int]]]) -> TPML_PCR_SELECTION:
    entries = []
    for bank, indices in selection:
        bitmap = bytearray(3)
        for i in indices:
            bitmap[i // 8] |= 1 << (i % 8)
        entries.append(
            TPMS_PCR_SELECTION(hash=_BANK_ALGS[bank], sizeofSelect=3, pcrSelect=bytes(bitmap))
        )
    return TPML_PCR_SELECTION(entries)


def _indices(sel: TPML_PCR_SELECTION) -> list[int]:
    out: list[int] = []
    for entry in sel:
        bitmap = bytes(entry.pcrSelect)[: entry.sizeofSelect]
        out.extend(i * 8 + b for i, byte in enumerate(bitmap) for b in range(8) if byte >> b & 1)
    return out
