"""Real-word vocabularies of the synthetic model's content domains.

Each domain's words get their own embedding direction, so text drawn from one domain routes to
that domain's planted experts. Invariants (checked at import): every word is lowercase letters
only (one pre-token under the byte-level split, hence one token), and no word belongs to two
domains or to a domain and the common words.
"""

from __future__ import annotations


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


DOMAIN_WORDS: dict[str, tuple[str, ...]] = {
    "code": _words(
        """
        function variable compiler kernel pointer array integer string boolean loop iterator
        recursion stack heap queue thread mutex semaphore socket buffer cache register
        syntax parser lexer token bytecode interpreter runtime debugger breakpoint exception
        module package library framework import export class method constructor interface
        inheritance polymorphism lambda closure callback promise async await commit branch
        merge rebase repository deploy container server client endpoint request response
        database query index schema migration json yaml struct enum tuple vector hashmap
        allocator garbage refactor benchmark profiler linter compile executable binary
        """
    ),
    "medicine": _words(
        """
        patient diagnosis symptom fever infection antibiotic vaccine virus bacteria immune
        inflammation tumor cancer chemotherapy radiology biopsy surgery surgeon anesthesia
        cardiology heart artery vein blood plasma platelet hemoglobin insulin diabetes
        hypertension cholesterol kidney liver lung pneumonia asthma allergy dermatology
        neurology stroke seizure migraine fracture orthopedic physician nurse clinic hospital
        prescription dosage tablet injection syringe pharmacist therapy rehabilitation
        pediatric geriatric prognosis chronic acute benign malignant pathology epidemic
        pandemic vaccination antibody antigen metabolism hormone thyroid enzyme protein
        """
    ),
    "law": _words(
        """
        court judge jury verdict plaintiff defendant attorney lawyer counsel prosecutor
        statute regulation constitution amendment legislation ordinance contract tort
        negligence liability damages injunction appeal appellate testimony witness evidence
        subpoena affidavit deposition litigation lawsuit settlement arbitration mediation
        indictment felony misdemeanor acquittal conviction sentence parole probation bail
        custody warrant jurisdiction precedent doctrine clause breach remedy plea tribunal
        magistrate barrister solicitor notary deed easement trustee fiduciary copyright
        trademark patent infringement defamation libel slander consent statutory
        """
    ),
    "sports": _words(
        """
        football soccer basketball baseball tennis hockey cricket rugby golf volleyball
        stadium arena referee umpire coach captain striker goalkeeper defender midfielder
        quarterback pitcher batter inning touchdown penalty tournament championship league
        playoff season fixture scoreboard trophy medal olympics marathon sprint relay
        athlete teammate roster transfer dribble tackle rebound dunk serve volley offside
        halftime overtime kickoff goal assist hattrick sprinter cyclist swimmer gymnast
        wrestler boxer knockout podium racket puck wicket bowler innings fans supporters
        """
    ),
    "cooking": _words(
        """
        recipe ingredient flour sugar butter salt pepper garlic onion tomato basil oregano
        cumin paprika cinnamon vanilla yeast dough bake roast simmer boil saute grill fry
        braise whisk knead chop dice mince marinate garnish oven stove skillet saucepan
        casserole spatula ladle colander cutting kitchen chef pastry bread cake cookie pie
        soup stew sauce broth bouillon gravy vinaigrette mayonnaise omelette pancake noodle
        risotto lasagna dumpling curry tortilla cheese cream yogurt lemon honey vinegar
        olive mushroom spinach carrot potato rice lentil
        """
    ),
    "music": _words(
        """
        melody harmony rhythm tempo chord scale octave pitch note rest measure bar
        symphony concerto sonata opera aria overture orchestra conductor choir soprano alto
        tenor baritone bass violin viola cello guitar piano keyboard drum trumpet trombone
        saxophone clarinet flute oboe bassoon harp banjo ukulele composer songwriter lyric
        chorus verse bridge album single concert rehearsal encore acoustic amplifier
        microphone studio recording vinyl playlist jazz blues rock reggae hiphop classical
        folk metal punk staccato legato crescendo fortissimo pianissimo allegro adagio
        """
    ),
    "astronomy": _words(
        """
        planet star galaxy nebula comet asteroid meteor meteorite moon orbit telescope
        observatory cosmos universe supernova pulsar quasar blackhole wormhole eclipse
        constellation equinox solstice zenith horizon gravity redshift spectrum luminosity
        parallax exoplanet satellite spacecraft rocket astronaut cosmonaut launch lunar
        solar mercury venus mars jupiter saturn uranus neptune pluto andromeda milky
        photon neutrino magnetar dwarf giant nova cluster void darkmatter cosmic radiation
        interstellar interplanetary heliosphere aurora sunspot corona perihelion aphelion
        """
    ),
    "finance": _words(
        """
        stock bond equity dividend portfolio investor shareholder market exchange broker
        trader asset expenditure revenue profit loss margin earnings valuation inflation
        interest mortgage loan credit debit deposit withdrawal savings pension annuity
        insurance premium hedge derivative futures option volatility liquidity solvency
        bankruptcy audit accounting ledger invoice payroll budget forecast fiscal monetary
        treasury currency dollar euro yen bitcoin cryptocurrency banking lender borrower
        collateral underwriting merger acquisition ipo capital venture yield
        """
    ),
}

# Function words shared by every domain; they carry no domain direction.
COMMON_WORDS: tuple[str, ...] = _words(
    """
    the a an and or but if then of to in on at by for with from about into over after
    before under between through during without within is are was were be been being has
    have had do does did will would can could should may might must this that these those
    it its they them their we our you your he she his her not no yes all some many more
    most other such very also just than so as when where which who what how why here there
    new old good first last long great little own same big high different small large next
    early young important few public bad able
    """
)

PUNCTUATION: tuple[str, ...] = (".", ",", ";", ":", "?", "!")


def _check() -> None:
    seen: dict[str, str] = {w: "common" for w in COMMON_WORDS}
    for domain, words in DOMAIN_WORDS.items():
        for w in words:
            if not (w.isalpha() and w.islower() and w.isascii()):
                raise ValueError(f"domain {domain!r}: word {w!r} is not lowercase ASCII letters")
            if w in seen:
                raise ValueError(f"word {w!r} is in both {seen[w]!r} and {domain!r}")
            seen[w] = domain


_check()
